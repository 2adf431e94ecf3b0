"""Dynamic batching: one batcher per model instance.

Requests (each a dict of arrays whose first axis is rows) wait in a bounded queue. The batcher takes the
first waiting request, then gathers more until the batch holds ``max_batch_size`` rows or
``max_queue_delay_ms`` has passed since that first request arrived (monotonic clock; it sleeps on an
``asyncio.Event`` with a timeout, never polls). It waits for company only under load, that is when requests
arrived while the previous batch was running, and only for batches that cost more than ``inline_below_ms``
(below that, waiting costs more than running): a lone client on an idle model is never made to wait for
requests that are not coming, so batching on is never slower than batching off. It runs them as one batch
and hands each request its own rows, as views. A sync function runs in the instance's executor, off the event
loop — unless the batch is predicted to take less than ``inline_below_ms`` (recent batches' time per row,
which rises at once and falls gradually, times its rows), in which case it runs on the loop: a tiny model's
batch costs less than the thread hand-off and the GIL round trip. An async function is awaited.

A request is never split across batches unless it alone holds more than ``max_batch_size`` rows; then it is
queued as consecutive chunks and the results concatenated. Expired requests are dropped before they run
(504); a failing batch fails exactly the requests in it, and the batcher keeps going.

Admission bounds the queueing *delay*, not only the count: a request's wait is predicted as the rows ahead of
it (queued and running) times the recent cost per row. One predicted to wait longer than ``max_queue_wait_ms``,
or to finish past its deadline, is refused at once with 429 and ``Retry-After`` (cheap, and the client can go
elsewhere) instead of timing out late; a request that could never fit the queue gets 413 naming the limit.
Left unset (``None``), the budget follows the model: ``AUTO_WAIT_ROWS`` rows' worth of the recent cost per row,
at least ``AUTO_WAIT_FLOOR_MS``, so that an admitted request's latency stays a small multiple of one row's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Union

import numpy as np

from deepserve.serve.errors import (
    DeadlineExceeded, InferenceFailed, Overloaded, PayloadTooLarge, ServeError, ShuttingDown,
)
from deepserve.serve.request_context import current_request_id

log = logging.getLogger("deepserve.serve.batcher")

AUTO_WAIT_ROWS = 1.5
"""The adaptive queue budget, in rows of the recent cost per row: a request waits about as long as its own row
takes, then its own batch runs, so an admitted request's latency stays within a few unloaded ones (ResNet-18 on
2 cores: a row ~5 ms; 3 rows let the 4x overload's admitted p99 reach ~8x the unloaded one)."""
AUTO_WAIT_FLOOR_MS = 15.0
"""The adaptive budget's floor: for a tiny model a row costs microseconds, and a burst of a few dozen requests
costs the event loop more than their queueing; it must not be shed."""
ADMIT_MAX_RISE = 1.25
"""Most that admission's cost per row may grow in one batch. A batch that waited out a stall of the whole process
(a full collection or another thread holding the GIL, preemption) is timed at the stall: 80 ms right after a
reload under load, thousands of a tiny model's rows, whose 5 % share in the moving average alone shed a
12-client burst. A sustained rise is followed as fast as before while under 6x (halfway up a 10x rise in 13
batches); a 1000x one takes 33 batches instead of 14."""

Tensors = dict[str, np.ndarray]
BatchFn = Callable[[Tensors], Union[Tensors, Awaitable[Tensors]]]


@dataclass(eq=False, slots=True)
class _Item:
    inputs: Tensors
    rows: int
    deadline: float | None
    enqueued: float
    future: asyncio.Future = field(repr=False)
    request_id: str = "-"
    queued: bool = True
    """Still in the queue (not yet taken by the batcher or removed)."""


class Batcher:
    """Gathers requests into batches for ``fn`` (``inputs -> outputs``, both keyed by tensor name)."""

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue_size: int = 1024,
        executor: Executor | None = None,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
        inline_below_ms: float = 0.0,
        max_queue_wait_ms: float | None = 0.0,
    ) -> None:
        self.fn = fn
        self.is_async = asyncio.iscoroutinefunction(fn)
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.executor = executor
        self.name = name
        self.on_batch = on_batch
        self.inline_below = inline_below_ms / 1000.0
        self.max_queue_wait = None if max_queue_wait_ms is None else max_queue_wait_ms / 1000.0
        """Longest predicted queueing delay admitted; 0 = no bound (only the deadline's); None = adaptive."""
        self._seconds_per_row: float | None = None  # batch cost estimate; unknown until a batch has run
        # admission's cost per row follows the cheap batches: down at once, up slowly. A batch slowed by the machine
        # (preempted, the GIL, a batch shape the runtime has not seen since the load) must not shed a burst
        self._admit_seconds_per_row = 0.0
        self._queued_rows = 0
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.in_flight = 0
        """Rows of the batch running now (0 when idle)."""
        self._arrived_while_running = 0  # requests queued during the running batch: a sign of load

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch in flight)."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.name}")

    async def stop(self) -> None:
        """Refuse new requests, finish every queued and in-flight one, then end the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit(self, inputs: Tensors, *, deadline: float | None = None) -> Tensors:
        """Queue one request and wait for its rows. ``deadline`` is a ``time.monotonic()`` instant."""
        if self._closing:
            raise ShuttingDown()
        rows = len(next(iter(inputs.values())))
        if rows <= self.max_batch_size:
            chunks = [inputs]
        else:  # too big for one batch: consecutive chunks, queued together
            chunks = [{k: v[i : i + self.max_batch_size] for k, v in inputs.items()}
                      for i in range(0, rows, self.max_batch_size)]
        now = time.monotonic()
        self.check_admission(rows, len(chunks), deadline, now)
        loop = asyncio.get_running_loop()
        request_id = current_request_id.get()
        items = [_Item(c, len(next(iter(c.values()))), deadline, now, loop.create_future(), request_id)
                 for c in chunks]
        self._queue.extend(items)
        self._queued_rows += rows
        if self.in_flight:
            self._arrived_while_running += 1
        self._wakeup.set()
        futures = [item.future for item in items]
        waiter = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
        # One timer fails the futures at the deadline (cheaper than asyncio.wait_for's wrapper per request).
        timer = None if deadline is None else loop.call_later(deadline - now, self._expire, futures)
        try:
            result = await waiter
        finally:
            if timer is not None:
                timer.cancel()
            for item in items:  # a timeout, a disconnect or a failed chunk: what is still queued need not run
                item.future.cancel()  # no-op once done
                if item.queued:
                    self._queue.remove(item)  # frees its queue slot now (rare path, O(queue))
                    self._dequeued(item)
        if len(futures) == 1:
            return result
        return {k: np.concatenate([r[k] for r in result]) for k in result[0]}

    def predicted_wait(self) -> float:
        """Seconds a request queued now would wait before its batch starts: the rows ahead of it (queued and
        running) at the recent cost per row. 0 when idle, so an idle batcher admits whatever its estimate."""
        return (self._queued_rows + self.in_flight) * self._admit_seconds_per_row

    def queue_budget(self) -> float:
        """Seconds a request may be predicted to wait: ``max_queue_wait_ms``, or when that is None a few rows'
        worth of the recent cost per row (at least ``AUTO_WAIT_FLOOR_MS``); 0 = no bound."""
        if self.max_queue_wait is not None:
            return self.max_queue_wait
        return max(AUTO_WAIT_FLOOR_MS / 1000.0, AUTO_WAIT_ROWS * self._admit_seconds_per_row)

    def check_admission(self, rows: int = 1, chunks: int = 1, deadline: float | None = None,
                        now: float | None = None) -> None:
        """Raise (413, 429, 504) unless a request of ``rows`` rows (``chunks`` queue entries) may queue now. Routes
        also ask before reading a body, so that shedding costs no body decoding."""
        now = time.monotonic() if now is None else now
        if chunks > self.max_queue_size:
            raise PayloadTooLarge(f"a request of {rows} rows needs {chunks} batches of max_batch_size "
                                  f"{self.max_batch_size}, more than max_queue_size {self.max_queue_size} of model "
                                  f"{self.name} can ever hold; send at most "
                                  f"{self.max_queue_size * self.max_batch_size} rows per request")
        if len(self._queue) + chunks > self.max_queue_size:
            raise Overloaded(f"model {self.name} is overloaded: {len(self._queue)} requests queued "
                             f"(max_queue_size {self.max_queue_size}); retry later", retry_after_s=1.0)
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"request deadline passed before it was queued for {self.name}")
        wait, budget = self.predicted_wait(), self.queue_budget()
        if budget and wait > budget:
            setting = "adaptive" if self.max_queue_wait is None else "max_queue_wait_ms"
            raise Overloaded(f"model {self.name} is overloaded: this request would wait about {wait * 1000:.0f} ms "
                             f"({setting} {budget * 1000:.0f}); retry later", retry_after_s=wait - budget)
        done = wait + rows * self._admit_seconds_per_row
        if deadline is not None and now + done > deadline and wait > 0:
            raise Overloaded(f"model {self.name} is overloaded: this request would be answered in about "
                             f"{done * 1000:.0f} ms, past its deadline in {(deadline - now) * 1000:.0f} ms; retry "
                             f"later", retry_after_s=wait)

    def _dequeued(self, item: _Item) -> None:
        item.queued = False
        self._queued_rows -= item.rows

    def _runs_inline(self, rows: int) -> bool:
        """Whether a batch of ``rows`` is cheap enough to run on the event loop (see the module docstring)."""
        return self._seconds_per_row is not None and self._seconds_per_row * rows < self.inline_below

    def _expire(self, futures: list[asyncio.Future]) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(DeadlineExceeded(f"request deadline exceeded while waiting for {self.name}"))

    async def _next_batch(self) -> list[_Item]:
        """Wait for requests and gather one batch; ``[]`` means closing with nothing left."""
        batch: list[_Item] = []
        rows = 0
        flush_at = 0.0
        under_load = self._arrived_while_running > 0
        self._arrived_while_running = 0
        while True:
            while self._queue:
                item = self._queue[0]
                if item.future.done():  # its waiter gave up (deadline, disconnect): drop it
                    self._dequeued(self._queue.popleft())
                    continue
                if batch and rows + item.rows > self.max_batch_size:
                    return batch  # it opens the next batch
                self._dequeued(self._queue.popleft())
                if not batch:
                    flush_at = item.enqueued + self.max_queue_delay
                batch.append(item)
                rows += item.rows
                if rows >= self.max_batch_size:
                    return batch
            if self._closing:
                return batch  # nothing more can arrive
            timeout = None
            if batch:
                timeout = flush_at - time.monotonic()
                # waiting for company pays only when running costs more than waiting: a batch cheap enough
                # to run inline goes now (requests that queued meanwhile still join it)
                if timeout <= 0 or not under_load or self._runs_inline(rows):
                    return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():
                    continue
                if item.deadline is not None and item.deadline <= now:
                    item.future.set_exception(DeadlineExceeded(f"request deadline exceeded in the queue of {self.name}"))
                    continue
                live.append(item)
            if live:
                await self._run_batch(loop, live)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        total = sum(item.rows for item in batch)
        self.in_flight = total
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs  # no copy for a lone request
            else:
                inputs = {k: np.concatenate([item.inputs[k] for item in batch]) for k in batch[0].inputs}
            if self.is_async:
                start = time.perf_counter()
                outputs = await self.fn(inputs)  # type: ignore[misc]
                elapsed = time.perf_counter() - start
            elif self._runs_inline(total):
                outputs, elapsed = _timed(self.fn, inputs)  # type: ignore[arg-type]
            else:
                # timed in the worker: the await also holds the event loop's backlog, which is not the batch's
                # cost (counting it kept a loaded loop's cheap batches off the loop for good)
                outputs, elapsed = await loop.run_in_executor(self.executor, _timed, self.fn, inputs)
            for k, v in outputs.items():
                if len(v) != total:
                    raise InferenceFailed(f"model output {k!r} has {len(v)} rows for a batch of {total}")
        except Exception as e:  # the batch's requests get the error; the loop goes on
            if not isinstance(e, ServeError):
                log.exception("batch of %d rows failed in %s (request ids %s)", total, self.name,
                              " ".join(item.request_id for item in batch))
                e = InferenceFailed(f"inference failed in {self.name}: {type(e).__name__}: {e}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        finally:
            self.in_flight = 0
        per_row = elapsed / total
        # up at once (a costly batch sends the next ones to the worker thread), down gradually
        estimate = self._seconds_per_row
        self._seconds_per_row = (per_row if estimate is None or per_row > estimate
                                 else 0.8 * estimate + 0.2 * per_row)
        if estimate is not None:  # the first batch (warm-up's first) pays one-off costs: not a prediction
            admit = self._admit_seconds_per_row
            self._admit_seconds_per_row = (per_row if not admit or per_row < admit
                                           else min(0.95 * admit + 0.05 * per_row, ADMIT_MAX_RISE * admit))
        if self.on_batch is not None:
            self.on_batch(total, elapsed)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result({k: v[offset : offset + item.rows] for k, v in outputs.items()})
            offset += item.rows


def _timed(fn: Callable[[Tensors], Tensors], inputs: Tensors) -> tuple[Tensors, float]:
    """``fn(inputs)`` and the seconds it took."""
    start = time.perf_counter()
    outputs = fn(inputs)
    return outputs, time.perf_counter() - start
