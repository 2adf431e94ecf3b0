"""Several server processes on one port: ``deepserve serve --workers N``.

uvicorn's own supervisor (``uvicorn.supervisors.Multiprocess``) binds the port once, spawns N workers that accept
on it, restarts a worker that dies or hangs, and on SIGTERM/SIGINT sends SIGTERM to each and waits for them. Each
worker builds the same app from the serve command's flags (``worker_app``, uvicorn's app factory) and drains as a
single server does: requests in flight finish, new ones get 503 with ``Connection: close``; a worker whose
supervisor was killed outright drains and stops the same way. What the processes share:

- **metrics**: prometheus-client's multiprocess mode, in a folder made for this run (``metrics_directory``), so
  ``/metrics`` from any worker sums every worker's counters and histograms (``metrics.Metrics.render``); the
  supervisor takes a dead worker's gauges away (``mark_process_dead``), so a crashed worker counts no more;
- **readiness**: ``/v2/health/ready`` is true only once every worker has loaded its models (a gauge each worker
  sets in that folder);
- **the listening socket**: the supervisor closes its copy before it stops the workers, so the last worker to
  stop accepting closes the socket itself: a later connection is refused rather than left queued to be reset when
  the supervisor exits. The workers run uvicorn's plain ``Server``, so unlike a single server
  (``shutdown.DrainingServer``) they do not accept and answer what is already queued when they close;
- **model control**: each worker holds its own models, so the admin routes that change them answer 409 (one
  worker cannot load or unload for the others); ``--model-control poll`` keeps every worker on the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from deepserve.serve.metrics import MULTIPROC_ENV, WORKERS_ENV

ARGS_ENV = "DEEPSERVE_SERVE_ARGS"
"""The serve command's flags (JSON) for the workers, which uvicorn starts as fresh interpreters (spawn)."""
METRICS_PREFIX = "deepserve-metrics-"
_LOCK = "supervisor.lock"
"""In a run's metrics folder: held (flock) by its supervisor while it runs; the kernel lets go when it dies."""


@contextmanager
def metrics_directory() -> Iterator[Path]:
    """This run's metrics folder, set as ``PROMETHEUS_MULTIPROC_DIR`` and removed at the end: made under the
    operator's ``PROMETHEUS_MULTIPROC_DIR`` if set, else the system's temporary folder. Folders there left by
    supervisors that were killed outright (their lock free) are removed first."""
    base = Path(os.environ.get(MULTIPROC_ENV) or tempfile.gettempdir())
    for stale in base.glob(f"{METRICS_PREFIX}*/{_LOCK}"):
        try:
            with open(stale, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(stale.parent, ignore_errors=True)
        except OSError:
            continue  # a running supervisor's (locked), another user's, or just removed by another start
    run = Path(tempfile.mkdtemp(prefix=METRICS_PREFIX, dir=base))
    with open(run / f".{_LOCK}", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(run / f".{_LOCK}", run / _LOCK)  # only ever seen locked
        operator_dir, os.environ[MULTIPROC_ENV] = os.environ.get(MULTIPROC_ENV), str(run)
        try:
            yield run
        finally:
            shutil.rmtree(run, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV)
            if operator_dir is not None:
                os.environ[MULTIPROC_ENV] = operator_dir


class Supervisor(Multiprocess):
    """uvicorn's supervisor, and what it does not do for a shared socket and shared metrics."""

    def terminate_all(self) -> None:
        for sock in self.sockets:  # the workers hold the last copies: the last to stop accepting closes it
            sock.close()
        super().terminate_all()

    def keep_subprocess_alive(self) -> None:
        before = list(self.processes)
        super().keep_subprocess_alive()
        for process in before:
            if process not in self.processes and process.pid is not None:  # died, and was replaced
                multiprocess.mark_process_dead(process.pid)


def run_workers(flags: dict[str, Any], args: argparse.Namespace, implementations: dict[str, str]) -> int:
    """Serve with ``args.workers`` processes under uvicorn's supervisor until SIGTERM/SIGINT; exit status 0.
    ``flags``: the command's flags as given, from which each worker builds its app. Called inside
    ``metrics_directory``."""
    import uvicorn

    from deepserve.serve.cli import uvicorn_config

    os.environ.update({ARGS_ENV: json.dumps(flags), WORKERS_ENV: str(args.workers)})
    base = uvicorn_config(None, args, implementations)
    # the app and its protocol by import path: the config is pickled into each spawned worker
    config = uvicorn.Config(f"{__name__}:worker_app", factory=True, workers=args.workers,
                            http=f"{__name__}:HttpProtocol", **{k: getattr(base, k) for k in _SHARED_CONFIG})
    Supervisor(config, sockets=[config.bind_socket()]).run()
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
