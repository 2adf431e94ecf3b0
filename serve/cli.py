"""``deepserve serve``: FastAPI on uvicorn over a model repository.

Only argparse at module level: ``deepserve`` builds every subcommand's parser, and serving must stay free of
training code. SIGTERM/SIGINT are handled by uvicorn gracefully: stop accepting, let the requests in flight
(and so everything queued in the batchers) finish, then the app's lifespan drains and releases the models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

_SETTING_FLAGS = (
    # flag, ModelSettings field, type, help
    ("--max-batch-size", "max_batch_size", int, "most rows per batch (default 32)"),
    ("--max-queue-delay-ms", "max_queue_delay_ms", float, "how long a batch waits to fill (default 2.0)"),
    ("--inline-batch-ms", "inline_batch_ms", float,
     "batches predicted to run faster than this run on the event loop, not a worker thread "
     "(default 0.5; 0 = never)"),
    ("--max-queue-size", "max_queue_size", int, "requests queued per instance before 429 (default 1024)"),
    ("--max-queue-wait-ms", "max_queue_wait_ms", float,
     "refuse (429 + Retry-After) requests predicted to wait longer in the queue (default: adaptive, 1.5 rows' "
     "worth of the model's recent time per row, at least 15 ms; 0 = no bound)"),
    ("--request-timeout-s", "request_timeout_s", float, "deadline of requests that bring none (default 30)"),
    ("--instances", "instances", int, "model instances, each with its own batcher (default 1)"),
    ("--precision", "precision", str, "graph variant: fp32 | int8 | fp16 (default fp32)"),
)

GIL_SWITCH_S = 0.0001
"""How long the event loop may keep the GIL while a model thread (the generation scheduler, a batcher's worker)
waits to take it back after a native call; Python's default is 5 ms. Under load the loop always wants the GIL,
so a ~1 ms generation step waited up to that long at each model call: at 4x offered load the char-LM's goodput
was 0.52 of capacity with 5 ms, 0.73 with 0.5 ms and 0.84 with 0.1 ms (one run each, same machine)."""

LOOPS = ("auto", "asyncio", "uvloop")
HTTP_PARSERS = ("auto", "h11", "httptools")
_FAST = {"loop": ("uvloop", "asyncio"), "http": ("httptools", "h11")}
"""flag -> (the implementation uvicorn[standard] brings, the pure-Python fallback)."""


class ServerOptionError(ValueError):
    """A --loop / --http choice that cannot be used here."""


def _default_port() -> int:
    raw = os.environ.get("PORT", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) < 65536 else 8000


def repository_path(args: argparse.Namespace) -> str:
    """``--repository``, or a one-model view of ``--model-dir`` named ``--model-name``."""
    if args.model_dir is None:
        if args.repository is None:
            raise ServerOptionError("give --repository DIR, or --model-dir DIR with --model-name NAME")
        if args.model_name is not None:
            raise ServerOptionError("--model-name goes with --model-dir, not --repository")
        return args.repository
    if args.repository is not None:
        raise ServerOptionError("give either --repository or --model-dir, not both")
    if args.model_name is None:
        raise ServerOptionError("--model-dir needs --model-name (the name clients use in /v2/models/NAME)")
    from deepserve.serve.model_dir import ModelDirError, single_model_view

    try:
        return str(single_model_view(args.model_dir, args.model_name, allow_symlinks_out=args.allow_symlinks_out))
    except (ModelDirError, OSError) as e:
        raise ServerOptionError(str(e)) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model repository over HTTP (KServe v2, TorchServe-style predictions, generation)",
        description="Load every model and version under --repository and serve them. Per-model settings come "
                    "from <repository>/<model>/config.json (or .yaml), then DEEPSERVE_<SETTING> environment "
                    "variables, then these flags, which apply to every model.",
    )
    p.add_argument("--repository", help="model repository: <repository>/<model>/<version>/")
    p.add_argument("--model-dir", help="serve one model from this folder instead of a repository (KServe mounts "
                                       "/mnt/models): an artifact version, or a model folder of versions")
    p.add_argument("--model-name", help="the name --model-dir is served under (KServe: the InferenceService name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_default_port(),
                   help="port to bind (default: $PORT when set, as KServe and Knative set it, else 8000)")
    p.add_argument("--engine", choices=("uvicorn", "ray"), default="uvicorn",
                   help="uvicorn: this process serves (default); ray: a Ray Serve application, one deployment "
                        "per model with replicas from config.json's ray section (pip install 'deepserve[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: a Ray cluster (auto, ray://host:10001); default starts a local one "
                        "bound to 127.0.0.1")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where models run")
    p.add_argument("--backend", choices=("auto", "onnx", "torchscript"), default=None,
                   help="runtime preference (default auto: ONNX Runtime on CPU, TorchScript on CUDA)")
    for flag, field, kind, text in _SETTING_FLAGS:
        p.add_argument(flag, dest=field, type=kind, default=None, help=text)
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (default 16)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest image (width x height), refused before decoding (default 4096x4096)")
    add_operations_flags(p)
    p.add_argument("--max-json-depth", type=int, default=64,
                   help="deepest nesting of arrays/objects a JSON body may have; deeper ones get 400 (default 64, "
                        "at most 512)")
    p.add_argument("--graceful-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long to wait for requests in flight; new requests get 503 meanwhile "
                        "(default 30)")
    p.add_argument("--keep-alive-s", type=float, default=75.0,
                   help="close keep-alive connections idle this long (default 75: above load balancers' 60)")
    p.add_argument("--header-timeout-s", type=float, default=20.0,
                   help="answer 408 and close a connection whose request headers take longer (default 20)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes accepting on the port, each with its own copy of the models (default 1); "
                        "/metrics and readiness cover them all; model control needs --model-control poll "
                        "(the admin load/unload routes answer 409)")
    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="event loop: uvloop when installed (auto, the default), or asyncio; measured on 2 cores, "
                        "uvloop serves the digits CNN's v2 requests 5-17%% faster, and the char-LM stream is within "
                        "0-7%% either way (benchmarks/results, the tail scenario)")
    p.add_argument("--http", choices=HTTP_PARSERS, default="auto",
                   help="HTTP/1.1 parser: httptools when installed (auto, the default), or h11")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="log lines as text or as JSON objects; both carry each request's X-Request-Id")
    p.add_argument("--trusted-keys", metavar="FILE|DIR", default=None,
                   help="serve only artifacts whose manifest is signed by this public key, or by one of the *.pub "
                   "files in this folder (default: $DEEPSERVE_TRUSTED_KEYS; unset: signatures are not required)")
    p.add_argument("--allow-symlinks-out", action="store_true",
                   help="serve model or version folders that are symlinks out of the repository (default: refused)")
    p.set_defaults(func=run)


def add_operations_flags(p: argparse.ArgumentParser) -> None:
    """Model control, API keys and CORS (see the README's "Operating deepserve")."""
    p.add_argument("--model-control", choices=("none", "explicit", "poll"), default="none",
                   help="none: load every model at start (default); explicit: only --load-model ones; "
                        "poll: load every model and rescan the repository every --poll-interval seconds")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with --model-control explicit: a model to load at start (repeatable; '*' for all)")
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between rescans in poll mode (default 5)")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer) on every route but health, readiness, docs "
                        "and metrics (default: $DEEPSERVE_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="a file of API keys, one per line, re-read when it changes (rotate keys by editing it)")
    p.add_argument("--admin-api-key", default=None,
                   help="key for model control (/v2/repository/...; default: $DEEPSERVE_ADMIN_API_KEY); "
                        "without one, model control answers only on loopback")
    p.add_argument("--metrics-auth", action="store_true", help="require an API key on /metrics too")
    p.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; '*' for any); CORS is off by default")


def access_policy(args: argparse.Namespace):  # -> deepserve.serve.auth.AccessPolicy
    """The API keys of the flags and environment; ``ValueError`` naming the flag when they do not fit."""
    import os

    from deepserve.serve.auth import AccessPolicy, KeySet

    api_key = args.api_key or os.environ.get("DEEPSERVE_API_KEY") or None
    admin_key = args.admin_api_key or os.environ.get("DEEPSERVE_ADMIN_API_KEY") or None
    policy = AccessPolicy(KeySet([api_key] if api_key else [], args.api_key_file),
                          KeySet([admin_key] if admin_key else []), metrics_auth=args.metrics_auth)
    if args.metrics_auth and not (policy.api_keys or policy.admin_keys):
        raise ValueError("--metrics-auth needs keys: give --api-key, --api-key-file or --admin-api-key")
    return policy


def check_model_control(args: argparse.Namespace, models: list[str]) -> None:
    """``ValueError`` naming the flag when --load-model does not fit the mode or the repository."""
    if args.load_model and args.model_control != "explicit":
        raise ValueError(f"--load-model needs --model-control explicit (got --model-control {args.model_control})")
    unknown = sorted(set(args.load_model) - set(models) - {"*"})
    if unknown:
        raise ValueError(f"--load-model {', '.join(unknown)}: not in the repository (it has {sorted(models)})")
    if not args.poll_interval > 0:
        raise ValueError(f"--poll-interval must be > 0 seconds, got {args.poll_interval}")


def server_implementations(loop: str = "auto", http: str = "auto") -> dict[str, str]:
    """``{"loop": ..., "http": ...}`` for ``--loop``/``--http``: ``auto`` takes uvloop / httptools when they are
    installed (``pip install 'uvicorn[standard]'``), else asyncio / h11. Naming a missing one raises
    ``ServerOptionError`` naming the flag."""
    import importlib.util

    chosen = {}
    for flag, value in (("loop", loop), ("http", http)):
        fast, fallback = _FAST[flag]
        installed = importlib.util.find_spec(fast) is not None
        if value == fast and not installed:
            raise ServerOptionError(f"--{flag} {fast}: {fast} is not installed "
                                    f"(pip install 'uvicorn[standard]'), or use --{flag} {fallback}")
        chosen[flag] = (fast if installed else fallback) if value == "auto" else value
    return chosen


def check_workers(args: argparse.Namespace) -> None:
    """``ServerOptionError`` naming --workers when it does not fit the other flags."""
    if args.workers < 1:
        raise ServerOptionError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and args.engine != "uvicorn":
        raise ServerOptionError("--workers is for --engine uvicorn; with --engine ray, replicas come from "
                                "config.json's ray section")


def check_server_flags(args: argparse.Namespace) -> None:
    """Raise ``ServerOptionError`` naming the first server flag with a bad value."""
    from deepserve.serve.http_util import MAX_JSON_DEPTH_LIMIT

    if not 1 <= args.max_json_depth <= MAX_JSON_DEPTH_LIMIT:
        raise ServerOptionError(f"--max-json-depth must be from 1 to {MAX_JSON_DEPTH_LIMIT}, got {args.max_json_depth}")
    for flag in ("graceful_timeout_s", "keep_alive_s", "header_timeout_s"):
        value = getattr(args, flag)
        if not 0 < value < float("inf"):
            raise ServerOptionError(f"--{flag.replace('_', '-')} must be a number > 0, got {value}")


def uvicorn_config(app, args: argparse.Namespace, implementations: dict[str, str]):  # -> uvicorn.Config
    import uvicorn

    from deepserve.serve.shutdown import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, draining_protocol

    # log_config=None: uvicorn's records go to the handler configure_logging installs (one format, request ids)
    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                          log_config=None, timeout_graceful_shutdown=args.graceful_timeout_s,
                          timeout_keep_alive=getattr(args, "keep_alive_s", DEFAULT_KEEP_ALIVE_S),
                          loop=implementations["loop"],
                          http=draining_protocol(implementations["http"],
                                                 getattr(args, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)))


def example_requests(base: str, tasks: dict[str, str]) -> str:
    """Copy-paste requests for the models found, each on an endpoint that fits its task."""
    lines = ["Try:", f"  curl {base}/v2/health/ready", f"  curl {base}/v2/models"]
    for model, task in tasks.items():
        if task == "image-classification":
            lines += [f"  curl -T digit.png '{base}/predictions/{model}?top_k=3'",
                      f"  curl -F data=@digit.png {base}/predictions/{model}"]
        elif task == "char-lm":
            lines.append(f"  curl {base}/v1/completions -H 'content-type: application/json' "
                         f"-d '{{\"model\": \"{model}\", \"prompt\": \"The \", \"max_tokens\": 80, "
                         f"\"temperature\": 0.8, \"seed\": 1}}'")
        elif task == "seq2seq":
            lines.append(f"  curl {base}/v2/models/{model}/generate -d '{{\"text_input\": "
                         f"\"What is the tens digit of 52873?\", \"parameters\": {{\"num_beams\": 4}}}}'")
    lines += [f"  curl {base}/metrics", f"  open {base}/docs"]
    return "\n".join(lines)


def model_tasks(repository: Path) -> dict[str, str]:
    """Model name -> task, read from the newest manifest of each model (for the examples only)."""
    tasks = {}
    for manifest in sorted(Path(repository).glob("*/*/manifest.json")):
        try:
            tasks[manifest.parent.parent.name] = json.loads(manifest.read_text()).get("task", "")
        except (OSError, ValueError):
            continue  # the repository reports broken artifacts itself
    return tasks


def _serving_inputs(args: argparse.Namespace) -> tuple[dict, str, Any, Any]:
    """``(settings overrides, device, access policy, artifact trust)`` of the flags; ``CLIError`` naming a bad one.
    Also resolves ``args.repository`` (``--model-dir``'s one-model view)."""
    from dataclasses import replace

    from deepserve.cli import CLIError
    from deepserve.serve.backends import BackendUnavailable, resolve_device
    from deepserve.serve.settings import SettingsError, resolve_settings
    from deepserve.signing import ArtifactTrust, trusted_keys_option

    overrides = {field: getattr(args, field) for _, field, _, _ in _SETTING_FLAGS}
    overrides["backend"] = args.backend
    try:
        check_server_flags(args)
        device = resolve_device(args.device)
        resolve_settings(None, {k: v for k, v in overrides.items() if v is not None})  # flags alone must be valid
        access = access_policy(args)
        trust = ArtifactTrust(trusted_keys_option(args.trusted_keys), args.allow_symlinks_out)
        args.repository = repository_path(args)
    except (FileNotFoundError, SettingsError, BackendUnavailable, ServerOptionError, ValueError) as e:
        raise CLIError(str(e)) from None
    if args.model_dir is not None:  # the view's one symlink, to the folder named on the command line
        trust = replace(trust, allow_symlinks_out=True)
    return overrides, device, access, trust


def open_repository(args: argparse.Namespace, inputs: tuple):  # -> ModelRepository
    """The repository the flags describe, scanned (nothing loaded yet); ``CLIError`` naming a bad flag."""
    from deepserve.cli import CLIError
    from deepserve.serve.backends import BackendUnavailable
    from deepserve.serve.repository import ModelRepository
    from deepserve.serve.settings import SettingsError

    overrides, device, _, trust = inputs
    try:
        repository = ModelRepository(args.repository, overrides=overrides, device=device,
                                     max_pixels=args.max_image_pixels, trust=trust, model_control=args.model_control,
                                     load_models=args.load_model, poll_interval_s=args.poll_interval)
        check_model_control(args, list(repository.models))
    except (FileNotFoundError, SettingsError, BackendUnavailable, ValueError) as e:
        raise CLIError(str(e)) from None
    return repository


def build_app(args: argparse.Namespace, inputs: tuple | None = None):  # -> (DeepServeApp, ModelRepository)
    """The app the flags describe (its models load when it starts); ``CLIError`` naming a bad flag."""
    from deepserve.serve.app import create_app

    inputs = inputs or _serving_inputs(args)
    access = inputs[2]
    repository = open_repository(args, inputs)
    app = create_app(repository, max_body_bytes=int(args.max_body_mb * 1024 * 1024), access=access,
                     cors_allow_origins=args.cors_allow_origin, max_json_depth=args.max_json_depth)
    return app, repository


def run(args: argparse.Namespace) -> int:
    from deepserve.cli import CLIError
    from deepserve.serve.request_context import configure_logging
    from deepserve.serve.shutdown import DrainingServer, run_server

    configure_logging(args.log_level, args.log_format)
    flags = {k: v for k, v in vars(args).items() if k != "func"}  # as given: each worker resolves them itself
    try:
        implementations = server_implementations(args.loop, args.http)
        check_workers(args)
    except ServerOptionError as e:
        raise CLIError(str(e)) from None
    inputs = _serving_inputs(args)
    if args.engine == "ray":
        from deepserve.serve.ray_app import run_cli

        overrides, _, access, trust = inputs
        try:
            return run_cli(args, overrides, trust, access)
        except (FileNotFoundError, ValueError) as e:  # flags that do not fit the repository: refused before Ray starts
            raise CLIError(str(e)) from None
    if args.workers > 1:
        from deepserve.serve.workers import metrics_directory, run_workers

        with metrics_directory():  # before the app: its metrics live there too
            _announce(args, implementations, open_repository(args, inputs))  # flags checked before any worker
            return run_workers(flags, args, implementations)
    app, repository = build_app(args, inputs)
    _announce(args, implementations, repository)
    sys.setswitchinterval(GIL_SWITCH_S)
    server = DrainingServer(uvicorn_config(app, args, implementations), app)
    return run_server(server)  # SIGTERM/SIGINT: drain (new requests 503), then the lifespan stops the models


def _announce(args: argparse.Namespace, implementations: dict[str, str], repository: Any) -> None:
    """Where the server answers, what it serves, and example requests."""
    host = f"[{args.host}]" if ":" in args.host else args.host
    workers = f", {args.workers} worker processes" if args.workers > 1 else ""
    print(f"deepserve: playground at http://{host}:{args.port}/ (open it in a browser)", flush=True)
    print(f"deepserve: serving {args.model_dir or args.repository} on http://{host}:{args.port} (device "
          f"{repository.device_request}, {implementations['loop']} loop, {implementations['http']} parser{workers}); "
          f"models: {', '.join(repository.models) or 'none'}", flush=True)
    if repository.trust.keys:
        print(f"deepserve: serving only artifacts signed by {', '.join(k.name for k in repository.trust.keys)}",
              flush=True)
    print(example_requests(f"http://{host}:{args.port}", model_tasks(args.repository)), flush=True)
