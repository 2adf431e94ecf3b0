"""Shared helpers for real-socket tests: a free loopback port, and waiting for a `deepserve serve` subprocess."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    """Poll ``base``/v2/health/ready (bounded: about 60 s on a busy 2-core machine); fail the test with the
    server's log if it exits or never gets ready."""
    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    pytest.fail(f"server not ready in time:\n{log.read_text()[-3000:]}")


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (a reset raises
    ``ConnectionResetError``)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
