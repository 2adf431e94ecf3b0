"""`deepserve serve` in a subprocess on a free loopback port, as a context manager, for tests that talk to it over
a real socket."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def running_server(repository: Path, log_dir: Path, *flags: str, python_args: Sequence[str] = (),
                   env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Serve ``repository`` (``flags`` added to the command line), waited on through /v2/health/ready with
    bounded retries. Yields ``{"base", "port", "proc", "stdout", "stderr"}`` (the last two: log files in
    ``log_dir``); the server is killed on exit if it still runs."""
    port = free_port()
    cmd = [sys.executable, *python_args, "-m", "deepserve.cli", "serve", "--repository", str(repository),
           "--port", str(port), "--device", "cpu", *flags]
    err, out = log_dir / "stderr.txt", log_dir / "stdout.txt"
    with open(err, "wb") as err_file, open(out, "wb") as out_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out_file, stderr=err_file,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, err)
        yield {"base": base, "port": port, "proc": proc, "stdout": out, "stderr": err}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def scrape(base: str, name: str) -> float:
    """The sum of a metric's samples (every label set) on the server's ``/metrics``."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
