"""``--model-control poll``: rescan the repository every ``poll_interval_s`` seconds and load what was added or
changed, unload what was removed.

A version counts as changed when its files' names, sizes, modification times or inodes differ from the last
scan. A half-copied artifact is never served: its load verifies every file's sha256 against its manifest and
fails (the version stays UNAVAILABLE, or its previous load keeps serving); as the copy goes on its files keep
changing, so the next scan tries again, and the scan after the copy completes loads it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepserve.serve.settings import CONFIG_FILES

if TYPE_CHECKING:
    from deepserve.serve.repository import ModelRepository

log = logging.getLogger("deepserve.serve")

Snapshot = dict[tuple[str, str], Any]
"""``(model, version number or "config") -> fingerprint``."""


def fingerprint(directory: Path) -> tuple:
    """What changes when any file under ``directory`` is added, removed, rewritten or replaced."""
    entries = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed while we looked: the next scan sees the result
                continue
            entries.append((os.path.relpath(path, directory), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(entries))


def snapshot(root: Path) -> Snapshot:
    """Every model's config files and version directories under ``root``, fingerprinted."""
    out: Snapshot = {}
    for model_dir in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        configs = [model_dir / name for name in CONFIG_FILES]
        out[(model_dir.name, "config")] = tuple((c.name, c.stat().st_size, c.stat().st_mtime_ns, c.stat().st_ino)
                                               for c in configs if c.is_file())
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                out[(model_dir.name, version_dir.name)] = fingerprint(version_dir)
    return out


class Poller:
    """The periodic rescan of one repository."""

    def __init__(self, repository: ModelRepository, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"--poll-interval must be > 0 seconds, got {interval_s!r}")
        self.repository = repository
        self.interval_s = interval_s
        self.seen: Snapshot = snapshot(repository.path)
        """The repository as the last scan (or start-up) found it."""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-poll")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        # A periodic rescan is what poll mode is: the wait ends early, at once, when the server stops.
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self.poll_once()
            except Exception:  # one bad scan (say, the repository unreadable) must not end polling: log it
                log.exception("rescanning %s failed; trying again in %.1f s", self.repository.path, self.interval_s)

    async def poll_once(self) -> None:
        """Rescan now: load new and changed versions, reload models whose config changed, unload removed ones."""
        repo = self.repository
        now = await asyncio.to_thread(snapshot, repo.path)
        before, self.seen = self.seen, now
        repo.scan()
        for name in sorted({m for m, _ in before} | {m for m, _ in now}):
            if not any(m == name for m, _ in now):
                if name in repo.models:
                    log.info("model %s was removed from the repository: unloading it", name)
                    await repo.unload_model(name)
                continue
            versions = {k for m, k in now if m == name and k != "config"}
            gone = {k for m, k in before if m == name and k != "config"} - versions
            config_changed = before.get((name, "config")) != now.get((name, "config"))
            changed = {int(k) for k in versions if before.get((name, k)) != now[(name, k)]}
            if config_changed:
                log.info("model %s: its config changed, reloading", name)
                await repo.load_quietly(name)
            elif changed or gone:
                log.info("model %s: versions %s added or changed, %s removed", name, sorted(changed), sorted(gone))
                await repo.load_quietly(name, versions=changed)
        repo.scan()
