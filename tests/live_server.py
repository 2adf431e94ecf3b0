"""``deepserve serve`` in a subprocess on a free loopback port, for the real-socket tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base: str
    port: int
    proc: subprocess.Popen
    stderr: Path
    stdout: Path

    def log(self) -> str:
        """Everything the server wrote, stdout and stderr."""
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@contextmanager
def serve(repository: Path, log_dir: Path, *flags: str, env: dict[str, str] | None = None,
          python_flags: tuple[str, ...] = ()) -> Iterator[LiveServer]:
    """Start the server, wait (bounded) until ``/v2/health/ready`` answers 200, yield it, kill it after."""
    port = free_port()
    stderr, stdout = log_dir / f"server-{port}.stderr", log_dir / f"server-{port}.stdout"
    cmd = [sys.executable, *python_flags, "-m", "deepserve.cli", "serve", "--repository", str(repository),
           "--port", str(port), "--device", "cpu", "--log-level", "info", *flags]
    with open(stderr, "wb") as err, open(stdout, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = LiveServer(f"http://127.0.0.1:{port}", port, proc, stderr, stdout)
    try:
        for _ in range(600):  # bounded: about 60 s on a busy 2-core machine
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
            try:
                if httpx.get(f"{server.base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        else:
            raise RuntimeError(f"server not ready in time:\n{server.log()[-3000:]}")
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
