"""``deepserve serve`` in a subprocess on a free loopback port, for the real-socket tests."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.servers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


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
def serve(repository: Path, log_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """Start the server, wait (bounded, ``servers.wait_ready``) until it is ready, yield it, kill it after."""
    port = free_port()
    stderr, stdout = log_dir / f"server-{port}.stderr", log_dir / f"server-{port}.stdout"
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repository", str(repository),
           "--port", str(port), "--device", "cpu", "--log-level", "info", *flags]
    with open(stderr, "wb") as err, open(stdout, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = LiveServer(f"http://127.0.0.1:{port}", port, proc, stderr, stdout)
    try:
        wait_ready(proc, server.base, stderr)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
