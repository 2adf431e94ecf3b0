"""Continuous batching: one loop per model instance, on its own thread.

Each iteration: admit waiting requests that fit (their rows join the batch: prefill or one batched encoder
call), run one model step over every running row, pick the next tokens (all greedy rows in one argmax, all
sampled rows in one vectorised sampler, beam requests one by one), then drop the rows of finished,
cancelled or expired requests and follow beam back-pointers with a single state gather. Plain requests
(``Job.plain``: no streaming, stop strings, logprobs or processors) cost nothing per row and step: their
tokens go into one ``TokenLog`` column per step, and the loop visits them only when a row picks EOS or
they reach max_new_tokens; a step where no row leaves builds no index at all. The asyncio side gets its
events through one ``call_soon_threadsafe`` per loop and step. The thread sleeps on a ``threading.Event``
when idle: no polling.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from deepserve.serve.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from deepserve.serve.generation import metrics as gm
from deepserve.serve.generation.admission import Admission, Slot
from deepserve.serve.generation.jobs import Event, EventKind, Job, TokenLog, deliver
from deepserve.serve.generation.step_models import StepModel
from deepserve.serve.generation.strategies import (
    BeamSearch, Sampling, greedy_tokens, log_softmax, sample_tokens,
)
from deepserve.serve.generation.tokenizers import CharTokenizer

log = logging.getLogger("deepserve.serve.generation")


@dataclass
class StepPlan:
    """How this step picks each running row's token: the rows by strategy, and the requests it must visit.
    Rebuilt only when the batch changes."""

    greedy: slice | np.ndarray
    """Rows chosen by argmax (``slice(None)`` when that is every row)."""
    any_greedy: bool
    starts: list[int]
    """Each running request's first row, in order (to find the request behind a row)."""
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Sampled rows, and each one's temperature, top-k and top-p."""
    temperature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    top_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    top_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    samplers: list[Job] = field(default_factory=list)
    """The sampling requests, in row order (each draws its rows' uniforms from its own generator)."""
    beams: list[Job] = field(default_factory=list)
    processed: list[Job] = field(default_factory=list)
    """Row requests with logit processors."""
    with_logprobs: list[Job] = field(default_factory=list)
    """Row requests that return logprobs."""
    visited: list[Job] = field(default_factory=list)
    """Requests looked at every step (all but the plain ones, see ``Job.plain``)."""


class RowMoves:
    """Where this step's rows go: runs of rows that stay in place, and the rows of requests that moved, in order.
    Requests whose rows all stay extend a run; only the others (beams, finished or partly finished requests)
    cut it, so a step where nothing leaves builds no index at all."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.index: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.run_start = 0
        """First row of the current run of unchanged rows."""
        self.moved = False
        self.regroup = False
        """Whether a request left or changed width (requests are renumbered, the model regroups its sources)."""
        self.new_tokens = rows
        self._chosen: list[int] | None = None

    def chosen_list(self, chosen: np.ndarray) -> list[int]:
        if self._chosen is None:
            self._chosen = chosen.tolist()
        return self._chosen

    def move(self, start: int, end: int, kept: tuple[np.ndarray, np.ndarray] | None, chosen: np.ndarray) -> None:
        """Rows [start, end) changed: close the run before them, then keep ``kept`` (rows, tokens) if any."""
        self.moved = True
        if self.run_start < start:
            self.index.append(np.arange(self.run_start, start))
            self.tokens.append(chosen[self.run_start:start])
        self.run_start = end
        if kept is not None:
            self.index.append(kept[0])
            self.tokens.append(kept[1])

    def finish(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The index of the rows kept, in their new order, and their next tokens."""
        if self.run_start < self.rows:
            self.move(self.rows, self.rows, None, chosen)
        if not self.index:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self.index), np.concatenate(self.tokens)


class Scheduler:
    def __init__(self, model: StepModel, tokenizer, *, max_running_rows: int, max_waiting: int,
                 name: str = "model", version: str = "1") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.char_level = isinstance(tokenizer, CharTokenizer)
        self.max_running_rows = max_running_rows
        self.max_waiting = max_waiting
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
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
        self._last_step: float | None = None  # when the previous iteration with running rows began

    # ---- asyncio side --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="generation-scheduler", daemon=True)
        self.thread.start()

    def admit(self, rows: int, max_new_tokens: int, deadline: float) -> None:
        """Refuse at once (``ShuttingDown``, or ``Overloaded``: 429 with Retry-After) a request of ``rows`` rows and
        up to ``max_new_tokens`` steps that could not start soon or finish by ``deadline``; called before the
        request is tokenized, so that a refusal costs little."""
        with self.lock:
            if self.closing:
                raise ShuttingDown()
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} generation requests are already waiting "
                                 f"(max_waiting={self.max_waiting})", retry_after_s=1.0)
            self.admission.check(self.steps, Slot(rows, max_new_tokens), deadline - time.monotonic(),
                                 self._running_slots, lambda: [Slot(j.reserve, j.max_new_tokens) for j in self.waiting])

    def submit(self, job: Job) -> None:
        """Queue ``job`` (after ``admit``)."""
        with self.lock:
            if self.closing:
                raise ShuttingDown()
            self.waiting.append(job)
            self.metrics.waiting.set(len(self.waiting))
            if not self.wake.is_set():  # set while the loop runs (it clears it under this lock when idle)
                self.wake.set()

    def _running_slots(self) -> list[Slot]:
        """The running requests' rows and remaining steps (read from the event loop: a step may be under way,
        which makes this at most one step stale)."""
        col = self.log.col
        return [Slot(j.reserve, (j.col0 + j.max_new_tokens - col) if j.plain else j.max_new_tokens - j.generated)
                for j in list(self.running) if not j.finished]

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
        return self.wait_until(lambda: self.model.rows <= rows and not self.waiting, timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds at a step boundary (checked whenever the batch may have changed)."""
        with self.rows_changed:
            return self.rows_changed.wait_for(predicate, timeout)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.running and not self.waiting:
                    if self.closing:
                        return
                    self.wake.clear()
            if not self.running and not self.waiting:
                self.wake.wait()
                continue
            try:
                self._iteration()
            except Exception as e:  # a failing graph fails the requests in the batch, not the server
                log.exception("generation step failed")
                self._fail_all(InferenceFailed(f"generation failed: {type(e).__name__}: {e}"))

    def _iteration(self) -> None:
        now = time.perf_counter()
        if self.running and self._last_step is not None:  # a step's wall time: selection, joins, the GIL included
            self.admission.observe(now - self._last_step)
        self._last_step = now if self.running else None
        outbox: list[tuple[Job, Event]] = []
        self._expire(outbox)
        self._admit(outbox)
        self._notify()
        if self.running:
            self._step(outbox)
        deliver(outbox)
        self._notify()

    def _notify(self) -> None:
        with self.rows_changed:
            self.rows_changed.notify_all()

    def _expire(self, outbox: list) -> None:
        """Remove cancelled and expired requests before the step (their rows are freed right away). Only looks
        at the requests when one was cancelled or the earliest deadline has passed (then that bound is renewed:
        one stale from a request that already left costs one more look)."""
        now = time.monotonic()
        if not self.cancels and now <= self.next_deadline:  # nothing to look for: no scan of every request
            return
        self.cancels = False
        gone = [j for j in self.running if j.cancelled or j.deadline < now]
        if gone:
            for j in gone:
                if not j.cancelled:
                    outbox.append((j, Event(EventKind.ERROR, error=DeadlineExceeded(
                        "the request's deadline passed during generation"))))
                j.finished = True
            self._compact(keep_jobs=[j for j in self.running if not j.finished])
        self.next_deadline = min((j.deadline for j in self.running), default=float("inf"))

    def _admit(self, outbox: list) -> None:
        joining: list[Job] = []
        now = time.monotonic()
        with self.lock:
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled or job.deadline < now:
                    self.waiting.popleft()
                    if not job.cancelled:
                        outbox.append((job, Event(EventKind.ERROR, error=DeadlineExceeded(
                            "the request's deadline passed while it waited for a decoding slot"))))
                    continue
                if self.reserved + job.reserve > self.max_running_rows:
                    break
                self.waiting.popleft()
                self.reserved += job.reserve
                joining.append(job)
            self.metrics.waiting.set(len(self.waiting))
        if not joining:
            return
        copies = [j.rows for j in joining]
        first = self.model.join([j.prompt_ids for j in joining], copies)
        start = len(self.tokens)
        for j in joining:
            j.start = start
            start += j.rows
        self.running.extend(joining)
        self.next_deadline = min(self.next_deadline, min(j.deadline for j in joining))
        self.tokens = np.concatenate([self.tokens, first])
        self.log.add_rows(len(first))
        for j in joining:
            if j.plain:
                j.col0 = self.log.col
                self.due.setdefault(j.col0 + max(1, j.max_new_tokens) - 1, []).append(j)
        self.fresh.extend(joining)
        self._plan = None
        self.metrics.running.set(self.model.rows)

    def _make_plan(self) -> StepPlan:
        """Group the running requests' rows by how their tokens are chosen."""
        running = self.running
        sampled = [j for j in running if isinstance(j.strategy, Sampling)]
        greedy = [r for j in running if j.strategy is None for r in range(j.start, j.start + j.rows)]
        widths = [j.rows for j in sampled]

        def per_row(name: str, dtype: type) -> np.ndarray:
            return np.repeat(np.asarray([getattr(j.strategy, name) for j in sampled], dtype), widths)

        rows = [j for j in running if not j.is_beam]
        return StepPlan(
            greedy=slice(None) if len(greedy) == self.model.rows else np.asarray(greedy, np.int64),
            any_greedy=bool(greedy), starts=[j.start for j in running],
            sample=np.asarray([r for j in sampled for r in range(j.start, j.start + j.rows)], np.int64),
            temperature=per_row("temperature", np.float32), top_k=per_row("top_k", np.int64),
            top_p=per_row("top_p", np.float64), samplers=sampled, beams=[j for j in running if j.is_beam],
            processed=[j for j in rows if j.processors],
            with_logprobs=[j for j in rows if j.params.logprobs is not None],
            visited=[j for j in running if not j.plain])

    def _step(self, outbox: list) -> None:
        """One step: run the model over every row, select each row's token, update the requests and the batch."""
        t0 = time.perf_counter()
        logits = self.model.step(self.tokens)  # (B,V)
        self.steps += 1
        if self._plan is None:
            self._plan = self._make_plan()
        plan = self._plan
        raw_lp = self._process(plan, logits)
        chosen = self._select(plan, logits)
        now = time.perf_counter()
        for j in self.fresh:
            j.t_first = now
            self.metrics.ttft.observe(now - j.t_submit)
        self.fresh = []
        self.log.write(chosen, self._oldest_column)
        visit = self._to_visit(plan, chosen)
        widths = {j.id: j.rows for j in plan.beams}  # before ``_beams_fast`` moves them
        if plan.beams:
            self._beams_fast(plan.beams, logits)
        moves = RowMoves(len(chosen))
        for j in visit:
            self._update(j, widths, chosen, logits, raw_lp.get(j.id), outbox, moves)
        self.metrics.tokens.inc(moves.new_tokens)
        self._apply(moves, chosen)
        if moves.regroup or visit is not plan.visited:
            self._plan = None
        self.metrics.step_seconds.observe(time.perf_counter() - t0)

    def _process(self, plan: StepPlan, logits: np.ndarray) -> dict[int, np.ndarray]:
        """Row requests' logprobs (the model's distribution, before the processors, for every strategy: see
        ``GenerationParams.logprobs``) and their logit processors, applied to their blocks in place."""
        raw_lp = {j.id: log_softmax(logits[j.start: j.start + j.rows]) for j in plan.with_logprobs}
        for j in plan.processed:
            block = logits[j.start: j.start + j.rows]
            hist = j.histories() if j.needs_history else []
            for proc in j.processors:
                proc(block, hist, j.generated)
        return raw_lp

    def _select(self, plan: StepPlan, logits: np.ndarray) -> np.ndarray:
        """Every greedy row in one argmax, every sampled row in one vectorised draw (beams: ``_beams_fast`` and
        ``_beam_step``, which move rows)."""
        chosen = np.empty(len(self.tokens), np.int64)
        if plan.any_greedy:
            chosen[plan.greedy] = greedy_tokens(logits[plan.greedy])
        if len(plan.sample):
            u = np.concatenate([j.strategy.rng.random(j.rows) for j in plan.samplers])  # a uniform per row
            chosen[plan.sample] = sample_tokens(logits[plan.sample], plan.temperature, plan.top_k, plan.top_p, u)
        return chosen

    def _to_visit(self, plan: StepPlan, chosen: np.ndarray) -> list[Job]:
        """The requests this step must look at: every one not plain, and plain ones whose row picked EOS (from
        then on they take the general path) or that reach max_new_tokens now."""
        eos = self.model.eos_id
        hits = np.flatnonzero(chosen == eos).tolist() if eos is not None else []
        ending = [j for j in self.due.pop(self.log.col - 1, ()) if not j.finished]
        if not hits and not ending:
            return plan.visited
        eos_jobs = {self.running[bisect.bisect_right(plan.starts, r) - 1] for r in hits}
        for j in eos_jobs:
            if j.plain:
                self._leave_log(j)
        ending = [j for j in ending if j.plain]
        return sorted({*plan.visited, *eos_jobs, *ending}, key=lambda j: j.start)

    def _update(self, j: Job, widths: dict[int, int], chosen: np.ndarray, logits: np.ndarray,
                raw_lp: np.ndarray | None, outbox: list, moves: RowMoves) -> None:
        """Advance request ``j`` by this step's tokens (events into ``outbox``) and record where its rows go."""
        start = j.start
        rows_before = widths[j.id] if j.is_beam else len(j.live)
        end = start + rows_before
        kept: tuple[np.ndarray, np.ndarray] | None = None  # the request's next rows and tokens, if it moved
        if j.is_beam:
            j.generated += 1
            moves.new_tokens -= rows_before - 1
            self._beam_step(j, logits[start:end], outbox)
            parents, toks = j.beam_out
            j.beam_out = ()
            changed = True
            if not j.finished:
                kept = (parents + start, toks)
        else:
            if j.plain:
                self._end_plain(j, outbox)
            else:
                j.generated += 1
                self._row_step(j, moves.chosen_list(chosen), raw_lp, self.model.eos_id, outbox)
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

    def _oldest_column(self) -> int:
        return min((j.col0 for j in self.running if j.plain), default=self.log.col)

    def _leave_log(self, j: Job) -> None:
        """A plain request that needs the general path (a row picked EOS): move its tokens from the log into
        its sequences, up to the step before this one (``_row_step`` takes this step's tokens)."""
        j.take_log(self.log, self.log.col - 1)
        j.plain = False

    def _end_plain(self, j: Job, outbox: list) -> None:
        """A plain request at max_new_tokens: its tokens from the log, every row finished by length."""
        j.take_log(self.log, self.log.col)
        for seq in j.live:
            seq.finish_reason = "length"
            self.metrics.finished("length")
        j.row_seqs, j.live = j.live, []
        self._finish(j, outbox)

    def _row_step(self, j: Job, chosen: list[int], raw_lp: np.ndarray | None, eos: int | None,
                  outbox: list) -> None:
        for event in j.advance(chosen, raw_lp, eos, self.char_level):
            outbox.append((j, event))
        for seq in j.row_seqs:
            if seq.finish_reason:
                self.metrics.finished(seq.finish_reason)
        if not j.live:
            self._finish(j, outbox)

    def _beams_fast(self, beams: list[Job], logits: np.ndarray) -> None:
        """Beam requests at full width without stops, logprobs or history-reading processors: one vectorised
        selection per beam width (``BeamSearch.select_many``); the others are left to ``_beam_step``.
        Processors that read no history (``min_new_tokens``) edit their request's block of scores first."""
        groups: dict[int, list[Job]] = {}
        for j in beams:
            k = j.params.num_beams
            if j.strategy.rows == k and not j.needs_history and not j.stops and j.params.logprobs is None:
                groups.setdefault(k, []).append(j)
        for k, jobs in groups.items():
            rows = np.concatenate([np.arange(j.start, j.start + k) for j in jobs])
            scores = log_softmax(logits[rows]).reshape(len(jobs), k, -1)
            for i, j in enumerate(jobs):
                for p in j.processors:  # j.generated counts the tokens before this step, as in _beam_step
                    p(scores[i], [], j.generated)
            for j, (toks, parents) in zip(jobs, BeamSearch.select_many([j.strategy for j in jobs], scores)):
                j.beam_out = (parents, toks)

    def _beam_step(self, j: Job, logits: np.ndarray, outbox: list) -> None:
        beam = j.strategy
        assert isinstance(beam, BeamSearch)
        if not j.beam_out:  # not already selected by the vectorised path
            scores = model_lp = log_softmax(logits)
            if j.processors:  # they rank the candidates; logprobs report the model's own distribution
                scores = model_lp.copy() if j.params.logprobs is not None else model_lp
                hist = j.histories() if j.needs_history else []
                for p in j.processors:
                    p(scores, hist, j.generated - 1)
            toks, parents = beam.select(scores, model_lp)
            j.beam_out = (parents, toks)
        if j.stream:
            text = j.beam_delta()
            if text:
                outbox.append((j, Event(EventKind.DELTA, index=-1, text=text)))
        if beam.done:
            for h in beam.best(j.params.num_return_sequences):
                self.metrics.finished(h.finish_reason)
            self._finish(j, outbox)

    def _finish(self, j: Job, outbox: list) -> None:
        j.finished = True
        result = j.result()
        if j.t_first is not None and result.completion_tokens > 1:
            per = (time.perf_counter() - j.t_first) / max(1, j.generated - 1)
            self.metrics.tpot.observe(per)
        outbox.append((j, Event(EventKind.DONE, result=result)))

    def _compact(self, keep_jobs: list[Job]) -> None:
        index = np.concatenate([np.arange(j.start, j.start + j.rows) for j in keep_jobs]) if keep_jobs \
            else np.zeros(0, np.int64)
        self.reserved = sum(j.reserve for j in keep_jobs)
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
        outbox = [(j, Event(EventKind.ERROR, error=error)) for j in self.running]
        for j in self.running:
            j.finished = True
        try:
            self._compact([])
        except Exception:  # the model state itself is broken: start from an empty batch
            log.exception("resetting the generation state failed")
        self.running, self.reserved, self.tokens = [], 0, np.zeros(0, np.int64)
        self.log, self.due, self.fresh = TokenLog(), {}, []
        deliver(outbox)
