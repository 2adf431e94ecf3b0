"""Admission by predicted finish time: a request joins the waiting queue only if it can start soon and finish
within its deadline; otherwise it is refused at once (429 with ``Retry-After``), before it costs anything.

Under overload a queue bounded by count only lets every admitted request wait behind all the others: their
latency grows to seconds, many pass their deadline mid-generation, and the work spent on them is lost. Here
the scheduler's own step time and each request's remaining token budget predict when batch rows free up; a
request is admitted while the wait this predicts is at most half the run time of a typical request (or of its
own, if longer) and wait plus run time fit before its deadline. The prediction uses
``max_new_tokens`` as each request's length: an upper bound when EOS or a stop string can end it earlier.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterable

from deepserve.serve.errors import Overloaded

QUEUE_BUDGET = 0.5
"""How long a request may be predicted to wait for rows, as a fraction of a typical request's run time (or of its
own, if longer): enough queue to refill the rows as they free up, little enough that waiting adds at most half a
run to an admitted request's latency."""
AVERAGE_WEIGHT = 0.05
"""Weight of the newest value in the moving averages of the step time and of the admitted requests' lengths
(they follow a batch that fills within tens of steps, yet one step that waited for the GIL does not swing
them)."""


@dataclass(frozen=True)
class Slot:
    """A request as admission sees it: batch rows it holds and steps it may still run."""

    rows: int
    steps: int


class Admission:
    """The step-time estimate and the admission rule of one scheduler."""

    def __init__(self, max_running_rows: int) -> None:
        self.max_running_rows = max_running_rows
        self.step_s = 0.0
        """Moving average of one scheduler step (model step and selection), in seconds."""
        self.typical_steps = 0.0
        """Moving average of the admitted requests' ``max_new_tokens``."""
        self.last_start = 0
        """Scheduler step at which the last admitted request is predicted to join the batch."""

    def observe(self, seconds: float) -> None:
        """A step took ``seconds``."""
        self.step_s = _average(self.step_s, seconds)

    def wait_steps(self, running: Iterable[Slot], waiting: Iterable[Slot], new: Slot) -> int:
        """Steps until ``new`` would join the batch: rows free as running requests end (each after its remaining
        steps), and the waiting requests ahead take them first, in order."""
        ends = sorted((s.steps, s.rows) for s in running)  # a sorted list is a heap
        free = self.max_running_rows - sum(rows for _, rows in ends)
        now = 0
        for slot in (*waiting, new):
            while free < slot.rows and ends:
                now, rows = heapq.heappop(ends)
                free += rows
            free -= slot.rows
            heapq.heappush(ends, (now + slot.steps, slot.rows))
        return now

    def check(self, step: int, new: Slot, time_left_s: float, running: Callable[[], Iterable[Slot]],
              waiting: Callable[[], Iterable[Slot]]) -> None:
        """Raise ``Overloaded`` (429, ``Retry-After``) unless ``new``, arriving at scheduler step ``step`` with
        ``time_left_s`` until its deadline, can start at the next step, or is predicted to start within
        ``QUEUE_BUDGET`` of a typical request's run time (or of its own) and finish before the deadline. Under
        overload most requests are refused by comparing with when the last admitted one starts, without
        looking at the others (``running`` and ``waiting`` are only called when that does not decide)."""
        budget = QUEUE_BUDGET * max(new.steps, self.typical_steps)
        if self.step_s and self.last_start - step > budget:
            self._refuse((self.last_start - step) * self.step_s, "the run time of a request")
        steps = self.wait_steps(running(), waiting(), new)
        wait, run = steps * self.step_s, new.steps * self.step_s
        if steps and (steps > budget or wait + run > time_left_s):  # not steps: rows are free now
            self._refuse(wait, "its deadline" if wait + run > time_left_s else "the run time of a request")
        self.typical_steps = _average(self.typical_steps, new.steps)
        self.last_start = max(self.last_start, step + steps)

    @staticmethod
    def _refuse(wait_s: float, why: str) -> None:
        raise Overloaded(f"generation is at capacity: this request would wait about {wait_s:.3f} s for a decoding "
                         f"slot, longer than {why} allows; retry later", retry_after_s=wait_s)


def _average(mean: float, value: float) -> float:
    """The moving average after ``value`` (the first value, while ``mean`` is 0)."""
    return mean + AVERAGE_WEIGHT * (value - mean) if mean else float(value)
