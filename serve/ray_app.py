"""deepserve as a Ray Serve application (``pip install 'deepserve[ray]'``): one deployment per model of a
repository, whose replicas each hold the model's servable with its own batcher or generation engine, behind an
ingress that exposes the same HTTP API as ``deepserve serve`` (``serve/ray_deployments.py``).

    deepserve serve --repository DIR --engine ray [--ray-address auto|ray://HOST:10001]
    serve run deepserve.serve.ray_app:build_app repository=DIR

Replicas and resources come from the ``ray`` section of ``<repository>/<model>/config.json``::

    {"max_batch_size": 32, "ray": {"num_replicas": 2, "num_cpus": 1}}
    {"ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}, "num_gpus": 1}}

On a cluster, every node must see the repository at the same path (a shared or synced folder).
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
    """``min_replicas``, ``max_replicas``, ``target_ongoing_requests``: Ray Serve's autoscaler drives the count."""
    num_cpus: float = 0.5
    """CPUs Ray reserves per replica (a scheduling token; the graphs' own threads are set by deepserve)."""
    num_gpus: float = 0.0
    """GPUs per replica; fractions share a GPU between replicas."""
    max_ongoing_requests: int = 256
    """Requests Ray sends a replica at once: enough to fill its batches (Ray's default of 5 would not)."""

    @classmethod
    def from_section(cls, path: Path | None, raw: dict[str, Any]) -> RayOptions:
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise SettingsError(f"{path}: unknown ray settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        if "num_replicas" in raw and "autoscaling" in raw:
            raise SettingsError(f"{path}: give ray.num_replicas or ray.autoscaling, not both")
        _number(path, "num_replicas", raw.get("num_replicas", 1), minimum=1, integer=True)
        _number(path, "max_ongoing_requests", raw.get("max_ongoing_requests", 256), minimum=1, integer=True)
        for name in ("num_cpus", "num_gpus"):
            _number(path, name, raw.get(name, 0), minimum=0)
        scaling = raw.get("autoscaling")
        if scaling is not None:
            if not isinstance(scaling, dict) or sorted(scaling) != sorted(_AUTOSCALING_KEYS):
                raise SettingsError(f"{path}: ray.autoscaling must give exactly {list(_AUTOSCALING_KEYS)}, "
                                    f"got {scaling!r}")
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


def plan(repository: str | Path) -> tuple[dict[str, RayOptions], dict[str, str]]:
    """The deployments a repository asks for: model -> its ``RayOptions``, and model -> why it gets none (a bad
    ``ray`` section; that model is reported not ready, the others serve). Models without version folders get
    neither: the ingress's repository reports them."""
    root = Path(repository)
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    deployments, why_not = {}, {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not any(v.is_dir() and v.name.isdigit() for v in model_dir.iterdir()):
            continue
        try:
            deployments[model_dir.name] = RayOptions.from_section(*read_engine_section(model_dir, "ray"))
        except SettingsError as e:
            why_not[model_dir.name] = str(e)
    return deployments, why_not


def application(options: AppOptions):  # -> ray.serve.Application
    """The ingress bound to one ``ModelReplica`` deployment per model of ``plan``."""
    from deepserve.serve.ray_deployments import Ingress, ModelReplica, ServingOptions

    root = Path(options.repository).resolve()
    deployments, why_not = plan(root)
    serving = ServingOptions(overrides=dict(options.overrides), device=options.device,
                             max_body_bytes=options.max_body_bytes, max_pixels=options.max_pixels,
                             **({"trust": options.trust} if options.trust is not None else {}))
    models = {
        name: ModelReplica.options(name=name, graceful_shutdown_timeout_s=options.graceful_timeout_s,
                                   **ray_options.deployment_options()).bind(str(root), name, serving)
        for name, ray_options in deployments.items()
    }
    return Ingress.options(name="ingress", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0.25},
                           graceful_shutdown_timeout_s=options.graceful_timeout_s).bind(
        str(root), models, serving, why_not)


def build_app(args: dict[str, str]):  # -> ray.serve.Application
    """``serve run deepserve.serve.ray_app:build_app repository=DIR [device=cpu]``."""
    unknown = sorted(set(args) - {"repository", "device"})
    if unknown or "repository" not in args:
        raise ValueError(f"build_app takes repository=DIR and optionally device=auto|cpu|cuda, got {sorted(args)}")
    return application(AppOptions(repository=args["repository"], device=args.get("device", "auto")))


def is_local(address: str | None) -> bool:
    """No address (a new local Ray) or one on the loopback."""
    return not address or address.removeprefix("ray://").split(":")[0] in ("127.0.0.1", "localhost")


def local_ray_env() -> dict[str, str]:
    """Environment for a local single-node Ray on 127.0.0.1. Ray otherwise resolves 127.0.0.1 to the machine's
    network address (so that other nodes could join); this documented switch keeps every node address on the
    loopback. It is read when ray is imported, and Ray's own processes inherit it."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


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


def refuse_unsupported(args: argparse.Namespace, access: Any) -> None:
    """``ValueError`` naming what ``--engine ray`` does not do yet rather than ignoring it: API keys and CORS
    (the ingress would not check them) and model control (replicas and redeploys are Ray's)."""
    if access is not None and (access.api_keys or access.admin_keys):
        raise ValueError("--engine ray does not check API keys yet: drop --api-key / --api-key-file / "
                         "--admin-api-key (and DEEPSERVE_API_KEY / DEEPSERVE_ADMIN_API_KEY), or serve without Ray")
    if args.cors_allow_origin:
        raise ValueError("--engine ray does not answer CORS yet: drop --cors-allow-origin")
    if args.model_control != "none" or args.load_model:
        raise ValueError(f"--model-control {args.model_control} / --load-model: with --engine ray every model of "
                         f"the repository is deployed; its replicas come from config.json's ray section")


def run_cli(args: argparse.Namespace, overrides: dict[str, Any], trust: Any = None, access: Any = None) -> int:
    """``deepserve serve --engine ray``: deploy, serve until SIGTERM/SIGINT, then drain and shut down."""
    refuse_unsupported(args, access)
    if is_local(args.ray_address):
        os.environ.update(local_ray_env())  # before ray is first imported
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from deepserve.serve.cli import example_requests, model_tasks

    options = AppOptions(repository=args.repository, overrides=overrides, device=args.device,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_image_pixels,
                         graceful_timeout_s=args.graceful_timeout_s, trust=trust)
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
