"""Several server processes on one port: ``deepserve serve --workers N``.

uvicorn's own supervisor (``uvicorn.supervisors.Multiprocess``) binds the port once, spawns N workers that accept
on it, restarts a worker that dies or hangs, and on SIGTERM/SIGINT sends SIGTERM to each and waits for them. Each
worker is a single server (``shutdown.DrainingServer``) over the app it builds from the serve command's flags, and
drains as one does: requests in flight finish, new ones get 503 with ``Connection: close``, and what waits in the
shared socket's accept queue when it stops accepting is accepted and answered so, not reset; a worker whose
supervisor was killed outright drains and stops the same way. What the processes share:

- **metrics**: prometheus-client's multiprocess mode, in a folder made for this run (``metrics_directory``), so
  ``/metrics`` from any worker sums every worker's counters and histograms (``metrics.Metrics.render``); the
  supervisor takes a dead worker's gauges away (``mark_process_dead``), so a crashed worker counts no more;
- **readiness**: ``/v2/health/ready`` is true only once every worker has loaded its models (a gauge each worker
  sets in that folder);
- **the listening socket**: at shutdown the supervisor stops it completing new handshakes
  (``shutdown.stop_new_connections``) and closes its copy before it stops the workers, so the last worker to
  stop accepting closes the socket itself, once it has answered its accept queue: a later connection is refused
  rather than left queued to be reset when the supervisor exits;
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
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess

from deepserve.serve.metrics import MULTIPROC_ENV, WORKERS_ENV
from deepserve.serve.shutdown import DrainingServer, stop_new_connections

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


class _WorkerServer(DrainingServer):
    """One worker's server: a single server's drain (``DrainingServer``) over the app and the uvicorn config it
    builds from the serve command's flags as it starts, on its own event loop."""

    owns_listeners = False  # a worker stopped on its own (SIGHUP, SIGTTOU) leaves the socket to the others

    def __init__(self, supervisor_config: uvicorn.Config) -> None:
        super().__init__(supervisor_config, None)  # nothing built yet: uvicorn's health checks only read ``started``

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        from deepserve.serve.cli import GIL_SWITCH_S, build_app, server_implementations, uvicorn_config
        from deepserve.serve.request_context import configure_logging

        args = argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))
        configure_logging(args.log_level, args.log_format)
        self.deepserve_app, _ = build_app(args)
        self.config = uvicorn_config(self.deepserve_app, args, server_implementations(args.loop, args.http))
        sys.setswitchinterval(GIL_SWITCH_S)
        parent = multiprocessing.parent_process()
        if parent is not None:  # a supervisor killed outright (SIGKILL) must not leave its workers serving
            asyncio.get_running_loop().add_reader(parent.sentinel, _parent_gone, parent.sentinel)
        await super().serve(sockets)


def _parent_gone(sentinel: int) -> None:
    """The supervisor has exited: drain and stop as on SIGTERM."""
    asyncio.get_running_loop().remove_reader(sentinel)
    signal.raise_signal(signal.SIGTERM)


class _Worker(uvicorn_multiprocess.Process):
    """uvicorn's worker process, serving with ``_WorkerServer`` instead of uvicorn's plain ``Server``."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        self.worker_server = _WorkerServer(self.config)  # before uvicorn's target answers health checks with it
        super().target(sockets)

    @property
    def server(self) -> uvicorn.Server:
        return self.worker_server


class Supervisor(uvicorn_multiprocess.Multiprocess):
    """uvicorn's supervisor, and what it does not do for a shared socket and shared metrics."""

    def run(self) -> None:
        # uvicorn makes each worker (at start, on SIGHUP and SIGTTIN, in place of a dead one) by this module-level
        # name, with no way to choose the class: ours while this supervisor runs
        uvicorn_process, uvicorn_multiprocess.Process = uvicorn_multiprocess.Process, _Worker
        try:
            super().run()
        finally:
            uvicorn_multiprocess.Process = uvicorn_process

    def terminate_all(self) -> None:
        for sock in self.sockets:  # the workers hold the last copies: the last to stop accepting closes it
            stop_new_connections(sock)  # the whole server stops: what the queue holds is answered, nothing added
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
    from deepserve.serve.cli import uvicorn_config

    os.environ.update({ARGS_ENV: json.dumps(flags), WORKERS_ENV: str(args.workers)})
    base = uvicorn_config(None, args, implementations)
    # the supervisor's part only (the port, logging): each worker builds its own app and config (_WorkerServer)
    config = uvicorn.Config(None, workers=args.workers, **{k: getattr(base, k) for k in _SUPERVISOR_CONFIG})
    Supervisor(config, sockets=[config.bind_socket()]).run()
    return 0


# the loop too: uvicorn sets up the worker's loop from this config before _WorkerServer takes its own
_SUPERVISOR_CONFIG = ("host", "port", "loop", "log_level", "access_log", "log_config")
