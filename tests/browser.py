"""Browser-test helpers: `deepserve serve` on a real socket, and headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``make test`` installs it): Playwright's own browser download needs the
internet. A machine without it fails these tests with a message saying how to install it, never skips them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    # no background connections: they fail (and stall) on a machine without internet
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]


def chromium_path() -> str:
    """Debian's chromium, or ``$DEEPSERVE_CHROMIUM``; fails the test (never skips) when there is none."""
    path = os.environ.get("DEEPSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the browser tests need Chromium: `make test` installs it (apt-get install chromium), "
                    "or set DEEPSERVE_CHROMIUM to a Chromium binary")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(repository: Path, log_dir: Path, *extra: str, env: dict[str, str] | None = None
                   ) -> Iterator[str]:
    """``deepserve serve`` in a subprocess on a free loopback port; yields its base URL once ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repository", str(repository), "--port", str(port),
           "--device", "cpu", "--log-level", "warning", *extra]
    err = log_dir / "server-stderr.txt"
    with open(err, "wb") as err_file, open(log_dir / "server-stdout.txt", "wb") as out_file:
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
        yield base
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a fresh profile per launch) as a Playwright ``Browser``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright for Python: pip install -e '.[dev]' (make test does)")
    executable = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def scrape(base: str, name: str) -> float:
    """The sum of a metric's samples (every label set) on the server's ``/metrics``."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
