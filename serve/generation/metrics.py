"""Generation metrics in prometheus-client's default registry, created once at import.

Per model and version: tokens generated, time to first token, time per output token, running rows, waiting
requests, finish reasons, and the time of one decoding step.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LABELS = ["model", "version"]

TOKENS = Counter("deepserve_generation_tokens", "Tokens generated (all rows, beams included)", LABELS)
TTFT = Histogram("deepserve_generation_time_to_first_token_seconds", "Submission to first generated token",
                 LABELS, buckets=_TIME_BUCKETS)
TPOT = Histogram("deepserve_generation_time_per_output_token_seconds",
                 "Mean time between output tokens of a request after the first", LABELS, buckets=_TOKEN_BUCKETS)
RUNNING = Gauge("deepserve_generation_running_rows", "Rows (sequences x beams) in the running batch", LABELS)
WAITING = Gauge("deepserve_generation_waiting_requests", "Requests waiting for a decoding slot", LABELS)
FINISH = Counter("deepserve_generation_finished_sequences", "Sequences finished, by reason (length|eos|stop)",
                 LABELS + ["reason"])
STEP = Histogram("deepserve_generation_step_seconds", "One continuous-batching step (model + selection)", LABELS,
                 buckets=_TOKEN_BUCKETS)


class ModelMetrics:
    """The labelled children for one model version (label lookups take a lock: done once)."""

    def __init__(self, model: str, version: str) -> None:
        self.labels = (model, version)
        self.tokens = TOKENS.labels(model, version)
        self.ttft = TTFT.labels(model, version)
        self.tpot = TPOT.labels(model, version)
        self.running = RUNNING.labels(model, version)
        self.waiting = WAITING.labels(model, version)
        self.step_seconds = STEP.labels(model, version)
        self._finish: dict[str, Counter] = {}

    def finished(self, reason: str) -> None:
        child = self._finish.get(reason)
        if child is None:
            child = self._finish[reason] = FINISH.labels(*self.labels, reason)
        child.inc()
