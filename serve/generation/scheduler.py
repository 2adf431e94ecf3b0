"""Continuous batching: one loop per model instance, on its own thread. Each iteration: stage the waiting requests
that fit, prefill staged prompts within ``prefill_budget`` tokens (a joining prompt delays running rows by a bounded
chunk) and let those done join, run one step over every running row, choose tokens (``batch.StepPlan``) and update
the requests. Rows move only where a request leaves or loses rows or a beam's parent has several children (rarely).
While rows run, arrivals hold staged prompts of one chunk back up to ``PREFILL_HOLD`` steps, so that a burst shares
one prefill call; the cost: a lone arrival joins one step later. Plain requests (``Job.plain``) cost nothing per row:
their tokens go into one ``TokenLog`` column per step. Events reach the asyncio side through one
``call_soon_threadsafe`` per loop and hand-over. The thread sleeps on a ``threading.Event`` when idle."""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from deepserve.serve.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from deepserve.serve.generation import metrics as gm
from deepserve.serve.generation.admission import Admission, Slot
from deepserve.serve.generation.batch import RowMoves, StepPlan, place_beams
from deepserve.serve.generation.jobs import Event, EventKind, Job, TokenLog, deliver
from deepserve.serve.generation.step_models import MAX_CHUNK, StepModel
from deepserve.serve.generation.tokenizers import CharTokenizer

log = logging.getLogger("deepserve.serve.generation")
PREFILL_TOKENS = 256  # per iteration at most (as vLLM's max_num_batched_tokens); char-LM 32 rows x 8: ~1.5 ms
PREFILL_HOLD = 4  # steps staged prompts may wait for the rest of a burst of requests


class Scheduler:
    def __init__(self, model: StepModel, tokenizer, *, max_running_rows: int, max_waiting: int,
                 name: str = "model", version: str = "1", prefill_budget: int = PREFILL_TOKENS) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.char_level = isinstance(tokenizer, CharTokenizer)
        self.pieces = np.asarray(tokenizer.pieces if self.char_level else [], object)  # token id -> its text
        self.max_running_rows = max_running_rows
        self.max_waiting = max_waiting
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.prefilling: list[Job] = []  # admitted, rows reserved, prompts staged in the model until they join
        self.prefill_budget = prefill_budget
        self.held_since: int | None = None  # the step since which arrivals hold staged prompts back
        self.reserved = 0
        self.tokens = np.zeros(0, np.int64)  # next input token of each row
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.rows_changed = threading.Condition()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.metrics = gm.ModelMetrics(name, version)
        self._plan: StepPlan | None = None  # rebuilt when the batch changes
        self.log = TokenLog()  # the tokens of plain requests (``Job.plain``), one column per step
        self.due: dict[int, list[Job]] = {}  # log column -> plain requests that reach max_new_tokens there
        self.fresh: list[Job] = []  # joined since the last step (their first token times TTFT)
        self.cancels = False  # a running request may have been cancelled since the last look
        self.next_deadline = float("inf")  # the earliest deadline of the running requests
        self.steps = 0
        self.admission = Admission(max_running_rows)
        self._last_step: float | None = None  # when the previous step began (None: no rows ran since)

    # ---- asyncio side --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="generation-scheduler", daemon=True)
        self.thread.start()

    def admit(self, rows: int, max_new_tokens: int, deadline: float) -> None:
        """Refuse at once (``ShuttingDown``, ``Overloaded``) a request that could not start soon or finish by
        ``deadline``; called before it is tokenized, so that a refusal costs little."""
        with self.lock:
            if self.closing:
                raise ShuttingDown()
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} generation requests are already waiting "
                                 f"(max_waiting={self.max_waiting})", retry_after_s=1.0)
            self.admission.check(self.reserved, Slot(rows, max_new_tokens), deadline - time.monotonic())

    def refuse_if_full(self) -> None:
        """``admit``'s refusal for a one-row request of typical length, before its body is read: no lock (a
        moment's staleness only moves the boundary by a request)."""
        if self.closing:
            raise ShuttingDown()
        self.admission.refuse_if_full(self.reserved)

    def submit(self, job: Job) -> None:
        """Queue ``job`` (after ``admit``)."""
        with self.lock:
            if self.closing:
                raise ShuttingDown()
            self.waiting.append(job)
            self.admission.queued(job.reserve)
            self.metrics.waiting.set(len(self.waiting))
            if not self.wake.is_set():  # set while the loop runs (it clears it under this lock when idle)
                self.wake.set()

    def cancel(self, job: Job) -> None:
        """Free the request's rows at the next step boundary (client gone, or deadline)."""
        job.cancelled = True
        self.cancels = True  # after the job's flag: the loop clears this one before it looks at the jobs
        self.wake.set()

    def close(self) -> None:
        """Refuse new work; the loop exits once everything queued and running has finished."""
        with self.lock:
            self.closing = True
            self.wake.set()

    def wait_rows(self, rows: int, timeout: float) -> bool:
        """Block until at most ``rows`` rows run and none wait (tests, drain)."""
        return self.wait_until(lambda: self.model.rows <= rows and not self.waiting and not self.prefilling, timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds at a step boundary (checked whenever the batch may have changed)."""
        with self.rows_changed:
            return self.rows_changed.wait_for(predicate, timeout)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                if idle := not self.running and not self.prefilling and not self.waiting:
                    if self.closing:
                        return
                    self.wake.clear()
            if idle:
                self.wake.wait()
                continue
            try:
                self.iteration()
            except Exception as e:  # a failing graph fails the requests in the batch, not the server
                log.exception("generation step failed")
                self._fail_all(InferenceFailed(f"generation failed: {type(e).__name__}: {e}"))

    def iteration(self) -> None:
        """One pass of the loop (the thread's; a test may drive a scheduler it did not start): admit, step, update."""
        outbox: list[tuple[Job, Event]] = []
        # a request is marked finished and its events handed over under one hold of ``rows_changed``, so that
        # a waiter never sees it finished before its events are on their way; the model runs outside it
        with self.rows_changed:
            self._expire(outbox)
            self._admit(outbox)
            self._hand_over(outbox)
        if not self.running:
            self._last_step = None
            return
        t0 = time.perf_counter()
        if self._last_step is not None:  # step to step: selection, joins, prefill, the GIL included
            self.admission.observe(t0 - self._last_step)
            self.metrics.step_interval.observe(t0 - self._last_step)
        self._last_step = t0
        logits = self.model.step(self.tokens)  # (B,V)
        with self.rows_changed:
            self._step(t0, logits, outbox)
            self._hand_over(outbox)

    def _hand_over(self, outbox: list) -> None:
        """Deliver ``outbox`` (the caller holds ``rows_changed``) and wake the waiters."""
        deliver(outbox)
        outbox.clear()
        self.rows_changed.notify_all()

    def _expire(self, outbox: list) -> None:
        """Remove cancelled and expired requests before the step; looks only when one was cancelled or the earliest
        deadline passed (then renewed: a stale one from a request that left costs one more look)."""
        now = time.monotonic()
        if not self.cancels and now <= self.next_deadline:  # nothing to look for: no scan of every request
            return
        self.cancels = False
        gone = [j for j in (*self.running, *self.prefilling) if j.cancelled or j.deadline < now]
        if gone:
            for j in gone:
                if not j.cancelled:
                    outbox.append((j, Event(EventKind.ERROR, error=DeadlineExceeded(
                        "the request's deadline passed during generation"))))
                j.finished = True
            self.model.unstage([i for i, j in enumerate(self.prefilling) if j.finished])
            self.prefilling = [j for j in self.prefilling if not j.finished]
            self._compact(keep_jobs=[j for j in self.running if not j.finished])
        self.next_deadline = min((j.deadline for j in (*self.running, *self.prefilling)), default=float("inf"))

    def _admit(self, outbox: list) -> None:
        """Stage the waiting requests that fit, then prefill unless arrivals hold the staged prompts back (never one of
        more than a chunk: each held step would delay its first token by a chunk, not one step)."""
        if joining := self._take_waiting(outbox) if self.waiting else []:  # a request queued meanwhile: next time
            self.model.stage([j.prompt_ids for j in joining])
            self.prefilling += joining
            self.next_deadline = min(self.next_deadline, min(j.deadline for j in joining))
            if self.running and self.reserved < self.max_running_rows and \
                    all(len(j.prompt_ids) <= MAX_CHUNK + 1 for j in self.prefilling):  # the last token is a step's
                self.held_since = self.steps if self.held_since is None else self.held_since
                if self.steps - self.held_since < PREFILL_HOLD:
                    return
        self.held_since = None
        if self.prefilling:
            self._join_prefilled()

    def _take_waiting(self, outbox: list) -> list[Job]:
        """Off the queue: expired and cancelled requests, then those whose rows fit, in order."""
        joining: list[Job] = []
        now = time.monotonic()
        with self.lock:
            while self.waiting and ((gone := self.waiting[0].cancelled or self.waiting[0].deadline < now)
                                    or self.reserved + self.waiting[0].reserve <= self.max_running_rows):
                job = self.waiting.popleft()
                self.admission.queued(-job.reserve)
                if not gone:
                    self.reserved += job.reserve
                    joining.append(job)
                elif not job.cancelled:
                    outbox.append((job, Event(EventKind.ERROR, error=DeadlineExceeded(
                        "the request's deadline passed while it waited for a decoding slot"))))
            self.metrics.waiting.set(len(self.waiting))
        return joining

    def _join_prefilled(self) -> None:
        """Spend this iteration's prefill budget; the requests whose prompts are done join the batch."""
        ready = self.model.prefill(self.prefill_budget)
        if not ready:
            return
        joining = [self.prefilling[i] for i in ready]
        first = self.model.join_staged(ready, [j.rows for j in joining])
        self.prefilling = [j for j in self.prefilling if j not in joining]
        start = len(self.tokens)
        for j in joining:
            j.start, start = start, start + j.rows
            if j.plain:
                j.col0 = self.log.col
                self.due.setdefault(j.col0 + max(1, j.max_new_tokens) - 1, []).append(j)
        self.running.extend(joining)
        self.tokens = np.concatenate([self.tokens, first])
        self.log.add_rows(len(first))
        self.fresh.extend(joining)
        self._plan = None
        self.metrics.running.set(self.model.rows)

    def _step(self, t0: float, logits: np.ndarray, outbox: list) -> None:
        """One step after the model ran (since ``t0``): select each row's token, update the requests and rows."""
        self.steps += 1
        plan = self._plan = self._plan or StepPlan.of(self.running, self.model.rows)
        raw_lp = plan.process(logits, self.log.col)
        chosen = plan.select(logits)
        now = time.perf_counter()
        for j in self.fresh:
            j.t_first = now
            self.metrics.ttft.observe(now - j.t_submit)
        self.fresh = []
        self.log.write(chosen, lambda: min((j.col0 for j in self.running if j.plain), default=self.log.col))
        visit = self._to_visit(plan, chosen)
        if plan.streamed:  # this step's piece for each streaming plain row (those visited send theirs themselves)
            skip = () if visit is plan.visited else set(visit)
            pieces = self.pieces[chosen[plan.stream_rows]].tolist()
            outbox.extend((j, Event(EventKind.DELTA, index=i, text=t)) for (j, i), t in zip(plan.streamed, pieces)
                          if t and j not in skip)
        plan.select_beams(logits)
        moves = RowMoves(len(chosen))
        for j in visit:
            self._update(j, chosen, raw_lp.get(j.id), outbox, moves)
        self.metrics.tokens.inc(moves.new_tokens)
        self._apply(moves, chosen)
        if moves.regroup or visit is not plan.visited:
            self._plan = None
        self.metrics.step_seconds.observe(time.perf_counter() - t0)

    def _to_visit(self, plan: StepPlan, chosen: np.ndarray) -> list[Job]:
        """The requests this step must look at: every one not plain, and plain ones whose row picked EOS (from
        then on they take the general path) or that reach max_new_tokens now."""
        eos, due = self.model.eos_id, self.due.pop(self.log.col - 1, ())
        if len(plan.visited) == len(self.running):  # no plain request
            return plan.visited
        hits = np.flatnonzero(chosen == eos).tolist() if eos is not None else []
        eos_jobs = {j for r in hits if (j := self.running[bisect.bisect_right(plan.starts, r) - 1]).plain}
        ending = [j for j in due if not j.finished and j.plain and j not in eos_jobs]
        if not eos_jobs and not ending:
            return plan.visited
        for j in eos_jobs:  # the general path from now: tokens up to this step's leave the log
            j.take_log(self.log, self.log.col - 1)
            j.plain = False
        return sorted({*plan.visited, *eos_jobs, *ending}, key=lambda j: j.start)

    def _update(self, j: Job, chosen: np.ndarray, raw_lp: np.ndarray | None, outbox: list, moves: RowMoves) -> None:
        """Advance request ``j`` by this step's tokens (events into ``outbox``) and record where its rows go."""
        start, rows_before = j.start, len(j.slots) if j.is_beam else len(j.live)
        end = start + rows_before
        kept: tuple[np.ndarray, np.ndarray] | None = None  # the request's next rows and tokens, if it moved
        if j.is_beam:
            j.generated += 1
            moves.new_tokens -= rows_before - 1
            if j.stream and (text := j.beam_delta()):
                outbox.append((j, Event(EventKind.DELTA, index=-1, text=text)))
            if j.strategy.done:
                for h in j.strategy.best(j.params.num_return_sequences):
                    self.metrics.finished(h.finish_reason)
                self._finish(j, outbox)
            else:
                j.slots, source = place_beams(j.slots, j.beam_out[0])
                toks = j.beam_out[1][np.argsort(j.slots)]  # in row order
                if source is None:  # every beam in its parent's row: nothing moves
                    chosen[start:end] = toks
                else:
                    kept = (source + start, toks)
            changed = j.finished or kept is not None
        else:
            if j.plain:
                self._end_plain(j, outbox)
            else:
                j.generated += 1
                outbox.extend((j, event) for event in j.advance(chosen, raw_lp, self.model.eos_id, self.char_level))
                for reason in (q.finish_reason for q in j.row_seqs if q.finish_reason):
                    self.metrics.finished(reason)
                if not j.live:
                    self._finish(j, outbox)
            changed = j.finished or len(j.live) != rows_before
            if changed and not j.finished:
                keep_rows = np.asarray([start + r for r, q in enumerate(j.row_seqs) if q.finish_reason is None],
                                       np.int64)
                kept = (keep_rows, chosen[keep_rows])
        if changed:
            moves.move(start, end, kept, chosen)
        if j.finished:
            moves.regroup = True
            self.reserved -= j.reserve
        else:
            moves.regroup |= j.rows != rows_before

    def _apply(self, moves: RowMoves, chosen: np.ndarray) -> None:
        """The next batch: the rows kept, in order, with their next tokens; requests renumbered if any left."""
        if not moves.moved:  # every row stays where it is
            self.tokens = chosen
        else:
            index, self.tokens = moves.finish(chosen)
            self.model.reorder(index, regroup=moves.regroup)
            self.log.reorder(index)
        if moves.regroup:
            self._renumber([j for j in self.running if not j.finished])

    def _end_plain(self, j: Job, outbox: list) -> None:
        """A plain request at max_new_tokens: its tokens from the log, every row finished by length."""
        j.take_log(self.log, self.log.col)
        for seq in j.live:
            seq.finish_reason = "length"
            self.metrics.finished("length")
            if j.stream:  # this step's piece, with the reason
                outbox.append((j, Event(EventKind.DELTA, index=seq.index, text=str(self.pieces[seq.tokens[-1]]),
                                        extra={"finish_reason": "length"})))
        j.row_seqs, j.live = j.live, []
        self._finish(j, outbox)

    def _finish(self, j: Job, outbox: list) -> None:
        j.finished = True
        result = j.result()
        if j.t_first is not None and result.completion_tokens > 1:
            self.metrics.tpot.observe((time.perf_counter() - j.t_first) / max(1, j.generated - 1))
        outbox.append((j, Event(EventKind.DONE, result=result)))

    def _compact(self, keep_jobs: list[Job]) -> None:
        index = np.concatenate([np.arange(j.start, j.start + j.rows) for j in keep_jobs]) if keep_jobs \
            else np.zeros(0, np.int64)
        self.reserved = sum(j.reserve for j in (*keep_jobs, *self.prefilling))
        self.model.reorder(index, regroup=True)
        self.log.reorder(index)
        self.tokens = self.tokens[index]
        self._renumber(keep_jobs)
        self._plan = None

    def _renumber(self, keep: list[Job]) -> None:
        """``keep`` becomes the running requests, their rows numbered in order."""
        start = 0
        for j in keep:
            j.start = start
            start += j.rows
        self.running = keep
        self.metrics.running.set(self.model.rows)

    def _fail_all(self, error: Exception) -> None:
        with self.rows_changed:  # as in ``iteration``: finished and handed over under one hold
            outbox = [(j, Event(EventKind.ERROR, error=error)) for j in (*self.running, *self.prefilling)]
            for j, _ in outbox:
                j.finished = True
            try:  # the model's own stage count: a failed call may have left it out of step with ``prefilling``
                self.model.unstage(list(range(len(self.model.staged))))
                self._compact([])
            except Exception:  # the model state itself is broken: the events below must still go out
                log.exception("resetting the generation state failed")
            self.running, self.prefilling, self.reserved, self.tokens = [], [], 0, np.zeros(0, np.int64)
            self.log, self.due, self.fresh = TokenLog(), {}, []
            self._hand_over(outbox)
