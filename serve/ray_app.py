"""deepserve as a Ray Serve application (``pip install 'deepserve[ray]'``): an ingress that exposes the same
HTTP API as ``deepserve serve`` (``serve/ray_deployments.py``), and one Ray Serve application per loaded model,
``deepserve.<model>``, whose replicas each hold the model's servable with its own batcher or generation engine
(``serve/ray_replica.py``). The ingress deploys a model's application when it loads the model (at start, or on
``POST /v2/repository/models/<model>/load``) and deletes it on unload (``serve/ray_control.py``).

    deepserve serve --repository DIR --engine ray [--ray-address auto|ray://HOST:10001] [--api-key ...]
    serve run deepserve.serve.ray_app:build_app repository=DIR

Replicas and resources come from the ``ray`` section of ``<repository>/<model>/config.json``::

    {"max_batch_size": 32, "ray": {"num_replicas": 2, "num_cpus": 1, "start_timeout_s": 600}}
    {"ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}, "num_gpus": 1}}

On a cluster, every node must see the repository (and an ``--api-key-file``) at the same path.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepserve.serve.settings import SettingsError, read_engine_section

APP_NAME = "deepserve"
_AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")
_AUTOSCALING_DELAYS = ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")
"""Optional: how long Ray's autoscaler waits before it adds or removes a replica, and the window it averages."""


def _number(path: Any, name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        what = "an integer" if integer else "a number"
        raise SettingsError(f"{path}: ray.{name} must be {what} >= {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class RayOptions:
    """A model deployment's replicas and resources (the ``ray`` section of its config file)."""

    num_replicas: int = 1
    """Fixed replica count (when ``autoscaling`` is not given)."""
    autoscaling: dict[str, Any] | None = None
    """``min_replicas``, ``max_replicas``, ``target_ongoing_requests`` (and optionally ``upscale_delay_s``,
    ``downscale_delay_s``, ``look_back_period_s``): Ray Serve's autoscaler drives the count."""
    num_cpus: float = 0.5
    """CPUs Ray reserves per replica (a scheduling token; the graphs' own threads are set by deepserve)."""
    num_gpus: float = 0.0
    """GPUs per replica; fractions share a GPU between replicas."""
    max_ongoing_requests: int = 256
    """Requests Ray sends a replica at once: enough to fill its batches (Ray's default of 5 would not)."""
    start_timeout_s: float = 300.0
    """How long a load waits for the replicas to start (placed, versions loaded and warmed up) before it fails."""

    @classmethod
    def from_section(cls, path: Path | str | None, raw: dict[str, Any]) -> RayOptions:
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise SettingsError(f"{path}: unknown ray settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        if "num_replicas" in raw and "autoscaling" in raw:
            raise SettingsError(f"{path}: give ray.num_replicas or ray.autoscaling, not both")
        _number(path, "num_replicas", raw.get("num_replicas", 1), minimum=1, integer=True)
        _number(path, "max_ongoing_requests", raw.get("max_ongoing_requests", 256), minimum=1, integer=True)
        for name in ("num_cpus", "num_gpus"):
            _number(path, name, raw.get(name, 0), minimum=0)
        _number(path, "start_timeout_s", raw.get("start_timeout_s", cls.start_timeout_s), minimum=1)
        scaling = raw.get("autoscaling")
        if scaling is not None:
            if (not isinstance(scaling, dict) or not set(_AUTOSCALING_KEYS) <= set(scaling)
                    or not set(scaling) <= {*_AUTOSCALING_KEYS, *_AUTOSCALING_DELAYS}):
                raise SettingsError(f"{path}: ray.autoscaling must give {list(_AUTOSCALING_KEYS)} and may give "
                                    f"{list(_AUTOSCALING_DELAYS)}, got {scaling!r}")
            for name in _AUTOSCALING_DELAYS:
                if name in scaling:
                    _number(path, f"autoscaling.{name}", scaling[name], minimum=0)
            _number(path, "autoscaling.min_replicas", scaling["min_replicas"], minimum=0, integer=True)
            _number(path, "autoscaling.max_replicas", scaling["max_replicas"],
                    minimum=max(1, scaling["min_replicas"]), integer=True)
            _number(path, "autoscaling.target_ongoing_requests", scaling["target_ongoing_requests"], minimum=1)
        return cls(**raw)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        scale: dict[str, Any] = ({"autoscaling_config": dict(self.autoscaling)} if self.autoscaling
                                 else {"num_replicas": self.num_replicas})
        return {**scale, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}


@dataclass(frozen=True)
class AppOptions:
    """The whole application: the repository and what the server's flags say."""

    repository: str
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    max_body_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    graceful_timeout_s: float = 30.0
    """How long a stopping replica may take to drain (Ray's graceful_shutdown_timeout_s)."""
    trust: Any = None
    """An ``ArtifactTrust`` (``--trusted-keys``, ``--allow-symlinks-out``); None: the repository's default."""
    front: Any = None
    """A ``FrontOptions`` (keys, CORS, ``--model-control``); None: the plain server's defaults."""


def model_options(model_dir: Path) -> RayOptions:
    """A model's deployment options, from the ``ray`` section of its config file; ``SettingsError`` naming the
    file and field when they are wrong."""
    return RayOptions.from_section(*read_engine_section(model_dir, "ray"))


def application(options: AppOptions):  # -> ray.serve.Application
    """The ingress; it deploys each model's application as it loads the model (``ray_control.py``)."""
    from deepserve.serve.ray_deployments import FrontOptions, Ingress
    from deepserve.serve.ray_replica import ServingOptions

    root = Path(options.repository).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    serving = ServingOptions(overrides=dict(options.overrides), device=options.device,
                             max_body_bytes=options.max_body_bytes, max_pixels=options.max_pixels,
                             graceful_timeout_s=options.graceful_timeout_s,
                             **({"trust": options.trust} if options.trust is not None else {}))
    return Ingress.options(name="ingress", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0.25},
                           graceful_shutdown_timeout_s=options.graceful_timeout_s).bind(
        str(root), serving, options.front or FrontOptions())


def build_app(args: dict[str, str]):  # -> ray.serve.Application
    """``serve run deepserve.serve.ray_app:build_app repository=DIR [device=cpu]``."""
    unknown = sorted(set(args) - {"repository", "device"})
    if unknown or "repository" not in args:
        raise ValueError(f"build_app takes repository=DIR and optionally device=auto|cpu|cuda, got {sorted(args)}")
    return application(AppOptions(repository=args["repository"], device=args.get("device", "auto")))


def is_local(address: str | None) -> bool:
    """No address (a new local Ray) or one on the loopback."""
    return not address or address.removeprefix("ray://").split(":")[0] in ("127.0.0.1", "localhost")


THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
"""Ray Serve's throughput-optimised mode (handle calls over gRPC, user code and router on the replica's own
event loop, no per-request log lines on stderr): 0.85x the CPU per request on the Ray path and 1.18x the
requests per second, measured on the digits CNN (``python -m benchmarks.run --only scaleout``). Without its
direct-ingress part, which would bind each replica an HTTP port of its own. Serve's processes read it at start:
set it on every node of a cluster."""


def local_ray_env() -> dict[str, str]:
    """Environment for a local single-node Ray on 127.0.0.1. Ray otherwise resolves 127.0.0.1 to the machine's
    network address (so that other nodes could join); this documented switch keeps every node address on the
    loopback. It is read when ray is imported, and Ray's own processes inherit it, as they do
    ``THROUGHPUT_ENV`` (unless the environment sets those variables itself)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **{k: os.environ.get(k, v) for k, v in THROUGHPUT_ENV.items()}}


def start_ray(address: str | None, host: str, port: int, *, num_cpus: int | None = None) -> None:
    """Connect to ``address``, or start a local single-node Ray on 127.0.0.1 (no dashboard); then Serve's HTTP
    proxy on ``host:port``."""
    if is_local(address):
        os.environ.update(local_ray_env())
    import ray
    from ray import serve

    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise ValueError(f"--ray-address {address}: {e}") from None
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})


def run_cli(args: argparse.Namespace, overrides: dict[str, Any], trust: Any = None, access: Any = None) -> int:
    """``deepserve serve --engine ray``: deploy, serve until SIGTERM/SIGINT, then drain and shut down."""
    if is_local(args.ray_address):
        os.environ.update(local_ray_env())  # before ray is first imported
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from deepserve.serve.cli import check_model_control, example_requests, model_tasks
    from deepserve.serve.ray_deployments import FrontOptions

    check_model_control(args, sorted(p.name for p in Path(args.repository).iterdir() if p.is_dir()))
    front = FrontOptions(access=access, cors_allow_origins=list(args.cors_allow_origin),
                         model_control=args.model_control, load_models=tuple(args.load_model),
                         poll_interval_s=args.poll_interval, max_json_depth=args.max_json_depth)
    options = AppOptions(repository=args.repository, overrides=overrides, device=args.device,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_image_pixels,
                         graceful_timeout_s=args.graceful_timeout_s, trust=trust, front=front)
    app = application(options)
    start_ray(args.ray_address, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RayServeException as e:
            raise ValueError(f"the Ray Serve application did not deploy: {e}") from None
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"deepserve: Ray Serve application {APP_NAME!r} serving {args.model_dir or args.repository} on "
              f"http://{host}:{args.port} (Ray at {ray.get_runtime_context().gcs_address})", flush=True)
        print(example_requests(f"http://{host}:{args.port}", model_tasks(args.repository)), flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s) before they exit
    return 0
