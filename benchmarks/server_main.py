"""Subprocess entry point for a server under test: ``python -m benchmarks.server_main --fd N {deepserve,echo}``.

The parent binds 127.0.0.1:0 and passes the listening socket (so the port is known before the child starts
and no connection is lost while it boots). Both apps run under the same uvicorn settings (``uvicorn_config``);
after uvicorn's startup (the app's lifespan, where deepserve loads and warms its models) the child writes
``READY`` on stdout.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

READY = "READY"


def uvicorn_config(app: Any, loop: str = "auto") -> uvicorn.Config:
    """One uvicorn configuration for every app under test, so the echo ceiling is comparable."""
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=120,
                          backlog=2048, loop=loop)


GC_MODES = ("shipped", "nofreeze", "disabled", "thresholds")
"""``--gc``: the collector as deepserve sets it (shipped); as before it did (nofreeze: start-up heap not frozen,
CPython's thresholds); off (disabled, the reference that cannot be shipped); frozen with ``--gc-thresholds``."""


def set_gc(mode: str, thresholds: tuple[int, ...]) -> None:
    """Applied once the app's start-up (and its ``settle()``) is done: the tail scenario's collector options."""
    if mode == "nofreeze":
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
    elif mode == "disabled":
        gc.disable()
    elif mode == "thresholds":
        gc.set_threshold(*thresholds)


class _Server(uvicorn.Server):
    gc_mode: tuple[str, tuple[int, ...]] = ("shipped", ())

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        set_gc(*self.gc_mode)
        if not self.should_exit:
            print(READY, flush=True)


def build_app(args: argparse.Namespace) -> Any:
    if args.app == "echo":
        from benchmarks.echo import create_echo_app

        return create_echo_app()
    from deepserve.serve.app import create_app

    accepted = inspect.signature(create_app).parameters
    kwargs = {k: v for k, v in (("device", args.device),) if k in accepted and v is not None}
    if args.max_queue_wait_ms is not None:
        kwargs["settings"] = {"max_queue_wait_ms": args.max_queue_wait_ms}
    return create_app(Path(args.repository), **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_main", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("app", choices=["deepserve", "echo"])
    parser.add_argument("--repository", help="model repository (deepserve only)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (deepserve only)")
    parser.add_argument("--max-queue-wait-ms", type=float, default=0.0,
                        help="deepserve's queue-delay budget; default 0 (off): closed-loop runs beside peers that "
                             "never shed measure every request served (the reliability suite measures shedding)")
    parser.add_argument("--gc", choices=GC_MODES, default="shipped", help="garbage collector option (see GC_MODES)")
    parser.add_argument("--gc-thresholds", default="700,10,10", help="with --gc thresholds: gc.set_threshold's")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="uvicorn's event loop (auto: uvloop when installed, as `deepserve serve --loop auto`)")
    args = parser.parse_args(argv)
    if args.app == "deepserve" and not args.repository:
        parser.error("--repository is required for the deepserve app")
    sock = socket.socket(fileno=args.fd)
    server = _Server(uvicorn_config(build_app(args), args.loop))
    if args.app == "deepserve":
        from deepserve.serve.cli import GIL_SWITCH_S

        sys.setswitchinterval(GIL_SWITCH_S)  # as `deepserve serve` runs
    server.gc_mode = (args.gc, tuple(int(t) for t in args.gc_thresholds.split(",")))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
