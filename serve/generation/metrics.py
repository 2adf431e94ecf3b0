"""Generation metrics in prometheus-client's default registry, created once at import.

Per model and version: tokens generated, time to first token, time per output token, running rows, waiting
requests, finish reasons, the time of one decoding step and between two (each running row's inter-token time).
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
INTERVAL = Histogram("deepserve_generation_step_interval_seconds", "From one step with running rows to the next "
                     "(joins and prefill included)", LABELS, buckets=[1e-4 * 1.25 ** i for i in range(32)])  # to 0.1 s


class ModelMetrics:
    """The labelled children for one model version (label lookups take a lock: done once)."""

    def __init__(self, model: str, version: str) -> None:
        self.labels, self.tokens = (model, version), TOKENS.labels(model, version)
        self.ttft, self.tpot = TTFT.labels(model, version), TPOT.labels(model, version)
        self.running, self.waiting = RUNNING.labels(model, version), WAITING.labels(model, version)
        self.step_seconds, self.step_interval = STEP.labels(model, version), INTERVAL.labels(model, version)
        self._finish: dict[str, Counter] = {}

    def finished(self, reason: str) -> None:
        if (child := self._finish.get(reason)) is None:
            child = self._finish[reason] = FINISH.labels(*self.labels, reason)
        child.inc()
