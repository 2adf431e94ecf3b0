"""Admission by predicted wait: a request joins the waiting queue only if it can start soon and finish within its
deadline; otherwise it is refused at once (429 with ``Retry-After``), before it costs anything.

A queue bounded by count lets every admitted request wait behind all the others under overload (seconds; many
pass their deadline mid-generation). Here the wait is predicted in O(1): in a full batch of requests
``typical_steps`` long, rows free up at ``max_running_rows / typical_steps`` per step, so a request that finds
``short`` more rows wanted (waiting ones ahead, its own) than free waits ``short * typical_steps /
max_running_rows`` steps. It is admitted while that is at most ``QUEUE_BUDGET`` of a typical run and wait plus run
fit its deadline. Lengths are ``max_new_tokens``, an upper bound: admission errs towards shedding. The rule needs
only the request's rows, so routes call ``refuse_if_full()`` before reading the body.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepserve.serve.errors import Overloaded

QUEUE_BUDGET = 0.25
"""How long a request may be predicted to wait for rows, as a fraction of a typical request's run time: enough
queue to refill the rows as they free up (a quarter of a batch waits), little enough that waiting adds at most a
quarter of a run to an admitted request's latency."""
AVERAGE_WEIGHT = 0.05
"""Weight of the newest value in the moving averages of the step time and of the admitted requests' lengths
(they follow a batch that fills within tens of steps, yet one step that waited for the GIL does not swing
them)."""


@dataclass(frozen=True)
class Slot:
    """A request as admission sees it: batch rows it holds and steps it may run."""

    rows: int
    steps: int


class Admission:
    """One scheduler's wait predictor and rule. The scheduler reports the queue under its lock; the event loop
    may read the counts one step stale, which the budget absorbs."""

    def __init__(self, max_running_rows: int) -> None:
        self.max_running_rows = max_running_rows
        self.step_s = 0.0  # Moving average of one scheduler step (model step and selection), in seconds.
        self.typical_steps = 0.0  # Moving average of the admitted requests' ``max_new_tokens``.
        self.waiting_rows = 0  # Rows reserved by the requests in the waiting queue.

    def queued(self, rows: int) -> None:
        """``rows`` rows joined the waiting queue (negative: left it, to run or gone)."""
        self.waiting_rows += rows

    def observe(self, seconds: float) -> None:
        """A step took ``seconds``."""
        self.step_s = _average(self.step_s, seconds)

    def wait_steps(self, reserved: int, rows: int) -> float:
        """Predicted steps until a request of ``rows`` rows joins the batch, with ``reserved`` rows running."""
        short = self.waiting_rows + rows - (self.max_running_rows - reserved)
        return 0.0 if short <= 0 else short * max(self.typical_steps, 1.0) / self.max_running_rows

    def check(self, reserved: int, new: Slot, time_left_s: float) -> None:
        """Raise ``Overloaded`` (429) unless ``new`` starts at the next step, or is predicted to start within
        ``QUEUE_BUDGET`` of a typical run and finish within ``time_left_s``."""
        typical = self.typical_steps or new.steps  # the first request is its own yardstick
        steps = self.wait_steps(reserved, new.rows)
        wait, run = steps * self.step_s, new.steps * self.step_s
        if steps and (steps > QUEUE_BUDGET * typical or wait + run > time_left_s):  # not steps: rows are free
            raise overloaded(wait, "its deadline" if wait + run > time_left_s else "the run time of a request")
        self.typical_steps = _average(self.typical_steps, new.steps)

    def refuse_if_full(self, reserved: int) -> None:
        """``check`` for a one-row request of typical length, before anything of it is known (routes call it
        before reading the body)."""
        steps = self.wait_steps(reserved, 1)
        if steps > QUEUE_BUDGET * self.typical_steps:
            raise overloaded(steps * self.step_s, "the run time of a request")


def overloaded(wait_s: float, why: str) -> Overloaded:
    return Overloaded(f"generation is at capacity: this request would wait about {wait_s:.3f} s for a decoding "
                      f"slot, longer than {why} allows; retry later", retry_after_s=wait_s)


def _average(mean: float, value: float) -> float:
    """The moving average after ``value`` (the first value, while ``mean`` is 0)."""
    return mean + AVERAGE_WEIGHT * (value - mean) if mean else float(value)
