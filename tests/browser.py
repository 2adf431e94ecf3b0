"""Headless Chromium driven by Playwright, for the browser tests, and the playground page as the tests drive it.

The browser is Debian's ``chromium`` (``make test`` installs it): Playwright's own browser download needs the
internet. A machine without it fails these tests with a message saying how to install it, never skips them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

WAIT_MS = 30_000
"""How long the page may take to show something (bounded waits, not timing assertions)."""

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


class Page:
    """A loaded playground page and every console error and uncaught exception it produced."""

    def __init__(self, page: Any, base: str, shots: Path) -> None:
        self.page, self.base, self.shots = page, base, shots
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, path: str = "/") -> Page:
        self.page.goto(self.base + path)
        self.page.wait_for_selector("body[data-ready]", timeout=WAIT_MS)
        return self

    def shoot(self, name: str, selector: str | None = None) -> Path:
        path = self.shots / f"{name}.png"
        if selector is None:
            self.page.screenshot(path=path, full_page=True)
        else:
            self.page.locator(selector).screenshot(path=path)
        return path


def generate(page: Page, model: str, mode: str, **fields: Any) -> None:
    """Pick the model, prompt and decoding mode, fill the named controls (#gen-<name>), press Generate."""
    p = page.page
    p.select_option("#gen-model", model)
    if "prompt" in fields:
        p.fill("#gen-prompt", fields.pop("prompt"))
    p.check(f'input[name="mode"][value="{mode}"]')
    for selector, value in fields.items():
        p.fill(f"#gen-{selector.replace('_', '-')}", str(value))
    p.click("#gen-run")
