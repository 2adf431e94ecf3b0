"""Prometheus metrics, one registry per repository (so several apps in one process do not collide).

Requests are counted by the app's front door (``http_util.HotPath``, for the per-request inference routes)
and, for every other route, by a small pure-ASGI middleware that reads the matched route and its ``model``
path parameter after routing; batchers report batch sizes and inference time through a hook, and queue depth is
read when scraped. ``/metrics`` renders this registry and prometheus-client's default one, where the
generation engine (``serve/generation/metrics.py``) and the process collectors register.

With several worker processes (``serve --workers``, ``PROMETHEUS_MULTIPROC_DIR`` set) prometheus-client keeps
every value in that folder and ``/metrics`` sums the workers' counters and histograms; a model counts as ready
there only while every worker has it ready. The queue depth, read at scrape time by a single process, is set by
each worker after each batch instead (as of its last batch: a worker's queue only changes while batches run), and
summed over the live workers. Not exported then: the per-process collectors.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess,
)

from deepserve.serve.model_state import ModelState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNKNOWN_MODEL = "<unknown>"
"""The ``model`` label of requests naming a model the repository does not have (no directory can be named
so): label values come only from the repository, so random names cannot grow the series without bound."""
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, *, include_default_registry: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.include_default_registry = include_default_registry
        """Render prometheus-client's default registry too (generation and process metrics)."""
        r = self.registry
        self.requests = Counter("deepserve_requests", "HTTP requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("deepserve_request_latency_seconds", "HTTP request latency",
                                 ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("deepserve_queue_depth", "Requests waiting in a model's batchers",
                                 ["model", "version"], registry=r, multiprocess_mode="livesum")
        self.batch_size = Histogram("deepserve_batch_size", "Rows per executed batch", ["model", "version"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("deepserve_inference_seconds", "Time to run one batch", ["model", "version"],
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.model_ready = Gauge("deepserve_model_ready", "1 when the model version is ready", ["model", "version"],
                                 registry=r, multiprocess_mode="livemin")
        self.model_state = Gauge("deepserve_model_state", "1 for the state each model version is in",
                                 ["model", "version", "state"], registry=r, multiprocess_mode="livemax")
        self.workers_ready = Gauge("deepserve_workers_ready", "Server processes that have loaded their models",
                                   registry=r, multiprocess_mode="livesum")
        self.loads = Counter("deepserve_model_loads", "Model version loads and reloads by outcome",
                             ["model", "outcome"], registry=r)
        self.load_seconds = Histogram("deepserve_model_load_seconds", "Time to verify, open and warm up a version",
                                      ["model"], buckets=_LOAD_BUCKETS, registry=r)
        self.unloads = Counter("deepserve_model_unloads", "Model unloads (each drains, then frees)", ["model"],
                               registry=r)
        self.rejected = Counter("deepserve_rejected_requests", "Requests refused by auth or a limit, by reason",
                                ["reason"], registry=r)
        self._request_children: dict[tuple[str, str, int], tuple] = {}
        self._models: frozenset[str] | None = None  # None: no repository told us its names (every label kept)
        self._depths: dict[tuple[str, str], Callable[[], float]] = {}  # with workers: read after each batch

    def set_models(self, names: Iterable[str]) -> None:
        """The model names requests may be labelled with; any other is counted as ``UNKNOWN_MODEL``."""
        self._models = frozenset(names)

    def batch_hook(self, model: str, version: str) -> Callable[[int, float], None]:
        """``on_batch(rows, seconds)`` for a model version's batchers."""
        size, seconds = self.batch_size.labels(model, version), self.inference.labels(model, version)
        waiting, depths, key = self.queue_depth.labels(model, version), self._depths, (model, version)

        def on_batch(rows: int, elapsed: float) -> None:
            size.observe(rows)
            seconds.observe(elapsed)
            depth = depths.get(key)
            if depth is not None:
                waiting.set(depth())

        return on_batch

    def track_queue_depth(self, model: str, version: str, depth: Callable[[], float]) -> None:
        """Read ``depth()`` (requests waiting in every instance of the version) at scrape time: nothing to
        update per request; with several workers, after each batch (other workers cannot call it)."""
        if multiprocess_dir():
            self._depths[(model, version)] = depth
            self.queue_depth.labels(model, version).set(0.0)
        else:
            self.queue_depth.labels(model, version).set_function(depth)

    def set_serving(self, serving: bool) -> None:
        """This process has loaded its models and serves (True), or has begun to stop (False: with several
        workers its values of the ready and state gauges go, see ``prometheus_client.multiprocess``)."""
        self.workers_ready.set(1.0 if serving else 0.0)
        if not serving and multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())

    def ready_workers(self) -> int:
        """Server processes serving this port that have loaded their models (this one alone without workers)."""
        registry = self.registry
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return int(registry.get_sample_value("deepserve_workers_ready") or 0)

    def set_ready(self, model: str, version: str, ready: bool) -> None:
        self.model_ready.labels(model, version).set(1.0 if ready else 0.0)

    def set_state(self, model: str, version: str, state: ModelState) -> None:
        """One series per state: 1 for the version's state, 0 for the others (and ``deepserve_model_ready``)."""
        for s in ModelState:
            self.model_state.labels(model, version, s.value).set(1.0 if s is state else 0.0)
        self.set_ready(model, version, state is ModelState.READY)

    def observe_load(self, model: str, ok: bool, seconds: float) -> None:
        self.loads.labels(model, "success" if ok else "failure").inc()
        self.load_seconds.labels(model).observe(seconds)

    def observe_unload(self, model: str) -> None:
        self.unloads.labels(model).inc()

    def reject(self, reason: str) -> None:
        """A request refused by auth or a limit (``reason``: e.g. ``missing_api_key``, ``body_too_large``)."""
        self.rejected.labels(reason).inc()

    def observe_request(self, model: str, endpoint: str, status: int, elapsed: float) -> None:
        if model and self._models is not None and model not in self._models:
            model = UNKNOWN_MODEL
        key = (model, endpoint, status)
        children = self._request_children.get(key)
        if children is None:  # label lookups take a lock: do each once, and keep the bound methods
            children = (self.requests.labels(model, endpoint, str(status)).inc,
                        self.latency.labels(model, endpoint).observe)
            self._request_children[key] = children
        children[0]()
        children[1](elapsed)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry, then of the default one (metric names differ); with
        several workers, every metric of every worker, summed."""
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        body = generate_latest(self.registry)
        if self.include_default_registry:
            body += generate_latest(REGISTRY)
        return body, CONTENT_TYPE_LATEST


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKERS_ENV = "DEEPSERVE_WORKERS"
"""How many workers serve the port; set in every worker (readiness waits for all of them)."""


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess folder, set when several worker processes serve (``serve/workers.py``)."""
    return os.environ.get(MULTIPROC_ENV) or None


def worker_count() -> int:
    """The number of server processes on this port (1 unless started by ``--workers``)."""
    raw = os.environ.get(WORKERS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


class RequestMetricsMiddleware:
    """Counts every routed request by ``(model path parameter, route name, status)`` and times it."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "name", None) or "unmatched"
            if endpoint != "metrics":
                model = (scope.get("path_params") or {}).get("model", "")
                self.metrics.observe_request(str(model), endpoint, status, time.perf_counter() - start)
