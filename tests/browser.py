"""Headless Chromium driven by Playwright, for the browser tests.

The browser is Debian's ``chromium`` (``make test`` installs it): Playwright's own browser download needs the
internet. A machine without it fails these tests with a message saying how to install it, never skips them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

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
