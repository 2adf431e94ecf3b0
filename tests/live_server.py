"""`deepserve serve` in a subprocess on a free loopback port, for tests that talk to it over a real socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        for _ in range(600):  # bounded: about 60 s on a busy 2-core machine
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{err.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        else:
            pytest.fail(f"server not ready in time:\n{err.read_text()[-3000:]}")
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
