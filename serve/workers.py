"""Several server processes on one port: ``deepserve serve --workers N``.

uvicorn's own supervisor (``uvicorn.supervisors.Multiprocess``) binds the port once, spawns N workers that accept
on it, restarts a worker that dies or hangs, and on SIGTERM/SIGINT sends SIGTERM to each and waits for them. Each
worker builds the same app from the serve command's flags (``worker_app``, uvicorn's app factory) and drains as a
single server does: requests in flight finish, new ones get 503 with ``Connection: close``; a worker whose
supervisor was killed outright drains and stops the same way. What the processes share:

- **metrics**: prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a folder made for this run),
  so ``/metrics`` from any worker sums every worker's counters and histograms (``metrics.Metrics.render``);
- **readiness**: ``/v2/health/ready`` is true only once every worker has loaded its models (a gauge each worker
  sets in that folder);
- **model control**: each worker holds its own models, so the admin routes that change them answer 409 (one
  worker cannot load or unload for the others); ``--model-control poll`` keeps every worker on the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
import tempfile
from functools import partial
from typing import Any

ARGS_ENV = "DEEPSERVE_SERVE_ARGS"
"""The serve command's flags (JSON) for the workers, which uvicorn starts as fresh interpreters (spawn)."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKERS_ENV = "DEEPSERVE_WORKERS"
"""How many workers serve the port; set in every worker (readiness waits for all of them)."""


def worker_count() -> int:
    """The number of server processes on this port (1 unless started by ``--workers``)."""
    raw = os.environ.get(WORKERS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def run_workers(flags: dict[str, Any], args: argparse.Namespace, implementations: dict[str, str]) -> int:
    """Serve with ``args.workers`` processes under uvicorn's supervisor until SIGTERM/SIGINT; exit status 0.
    ``flags``: the command's flags as given, from which each worker builds its app."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from deepserve.serve.cli import uvicorn_config

    with tempfile.TemporaryDirectory(prefix="deepserve-metrics-") as metrics_dir:
        os.environ.update({ARGS_ENV: json.dumps(flags), MULTIPROC_ENV: metrics_dir, WORKERS_ENV: str(args.workers)})
        base = uvicorn_config(None, args, implementations)
        # the app and its protocol by import path: the config is pickled into each spawned worker
        config = uvicorn.Config(f"{__name__}:worker_app", factory=True, workers=args.workers,
                                http=f"{__name__}:HttpProtocol", **{k: getattr(base, k) for k in _SHARED_CONFIG})
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    return 0


_SHARED_CONFIG = ("host", "port", "log_level", "access_log", "log_config", "timeout_graceful_shutdown",
                  "timeout_keep_alive", "loop")


def _args() -> argparse.Namespace:
    return argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))


def __getattr__(name: str) -> Any:
    """``HttpProtocol``: the draining protocol of the serve flags, built in the worker that imports it."""
    if name != "HttpProtocol":
        raise AttributeError(name)
    from deepserve.serve.cli import server_implementations
    from deepserve.serve.shutdown import draining_protocol

    args = _args()
    return draining_protocol(server_implementations(args.loop, args.http)["http"], args.header_timeout_s)


def worker_app() -> Any:
    """The app of one worker (uvicorn's factory, called in the worker as it starts serving)."""
    from deepserve.serve.cli import GIL_SWITCH_S, build_app
    from deepserve.serve.request_context import configure_logging

    args = _args()
    configure_logging(args.log_level, args.log_format)
    app, _ = build_app(args)
    sys.setswitchinterval(GIL_SWITCH_S)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn's handler is installed by now: drain first, then it
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, partial(_drain_then, app, previous))
    parent = multiprocessing.parent_process()
    if parent is not None:  # a supervisor killed outright (SIGKILL) must not leave its workers serving
        asyncio.get_running_loop().add_reader(parent.sentinel, _parent_gone, parent.sentinel)
    return app


def _parent_gone(sentinel: int) -> None:
    """The supervisor has exited: drain and stop as on SIGTERM."""
    asyncio.get_running_loop().remove_reader(sentinel)
    signal.raise_signal(signal.SIGTERM)


def _drain_then(app: Any, previous: Any, sig: int, frame: Any) -> None:
    """What ``shutdown.DrainingServer`` does in a single server: new requests get 503 from now on."""
    app.draining = True
    previous(sig, frame)
