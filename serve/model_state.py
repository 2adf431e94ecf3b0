"""What the repository knows about each model version: its state (one enum), the servable it runs now, the
requests holding that servable, and the version policy that picks which versions are loaded.

A request that obtains a servable through ``ModelRepository.get`` holds it until its response has been sent
(``request_leases``, entered once per request by the app's front door). A servable that a reload or an
unload replaces is no longer handed out, and is stopped only once no request holds it: running generations
finish on the graphs they started on, and a request that looked a servable up just before the switch still
finds it working.
"""

from __future__ import annotations

import asyncio
import enum
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deepserve.serve.servable import Servable


class ModelState(str, enum.Enum):
    """A model version's state, in Triton's words (``POST /v2/repository/index``)."""

    READY = "READY"
    """Serving requests (a reload may be warming a replacement beside it)."""
    LOADING = "LOADING"
    """Being verified, opened and warmed up; not serving yet."""
    UNLOADING = "UNLOADING"
    """Refusing new requests while the ones in flight finish."""
    UNAVAILABLE = "UNAVAILABLE"
    """Not loaded: never asked for, unloaded, outside the version policy, or its load failed (see reason)."""


class Loaded:
    """One servable the repository started, and how many requests hold it."""

    def __init__(self, servable: Servable) -> None:
        self.servable = servable
        self.holders = 0
        self.retired = False
        self._idle = asyncio.Event()
        self._idle.set()

    def hold(self) -> None:
        self.holders += 1
        self._idle.clear()

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self._idle.set()

    async def drain_and_stop(self) -> None:
        """Wait until no request holds the servable (it is no longer handed out), then stop it, which
        finishes whatever work is still queued and frees the graphs."""
        self.retired = True
        await self._idle.wait()
        await self.servable.stop()


_LEASES: ContextVar[list[Loaded] | None] = ContextVar("deepserve_request_leases", default=None)


@contextmanager
def request_leases() -> Iterator[None]:
    """For one HTTP request: every servable it looks up is held until the block ends (the response sent)."""
    held: list[Loaded] = []
    token = _LEASES.set(held)
    try:
        yield
    finally:
        _LEASES.reset(token)
        for loaded in held:
            loaded.release()


def lease(loaded: Loaded) -> None:
    """Hold ``loaded`` for the current request, if one is running (lookups outside requests hold nothing)."""
    held = _LEASES.get()
    if held is not None:
        loaded.hold()
        held.append(loaded)


class PolicyKind(str, enum.Enum):
    ALL = "all"
    LATEST = "latest"
    SPECIFIC = "specific"


_LATEST = re.compile(r"latest\s*(\d+)")


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are loaded (Triton's ``version_policy``)."""

    kind: PolicyKind = PolicyKind.ALL
    count: int = 0
    """``latest``: how many of the newest versions."""
    versions: tuple[int, ...] = ()
    """``specific``: exactly these versions."""

    @classmethod
    def parse(cls, raw: Any) -> VersionPolicy:
        """``"all"``, ``"latest N"``, a list of versions, or Triton's ``{"latest": {"num_versions": N}}`` /
        ``{"specific": {"versions": [...]}}`` / ``{"all": {}}``. Raises ``ValueError`` naming the value."""
        if isinstance(raw, VersionPolicy):
            return raw
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, body), = raw.items()
            body = body if isinstance(body, dict) else {}
            raw = {"all": "all", "latest": f"latest {body.get('num_versions', '')}",
                   "specific": body.get("versions")}.get(kind, raw)
        if isinstance(raw, str):
            text = raw.strip().lower()
            if text == "all":
                return cls()
            match = _LATEST.fullmatch(text)
            if match and int(match.group(1)) >= 1:
                return cls(PolicyKind.LATEST, count=int(match.group(1)))
        elif isinstance(raw, list) and raw and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                   for v in raw):
            return cls(PolicyKind.SPECIFIC, versions=tuple(sorted(set(raw))))
        raise ValueError(f'version_policy must be "all", "latest N" (N >= 1) or a list of versions, got {raw!r}')

    def select(self, available: list[int]) -> list[int]:
        """The versions to load out of ``available`` (sorted)."""
        if self.kind is PolicyKind.LATEST:
            return sorted(available)[-self.count:]
        if self.kind is PolicyKind.SPECIFIC:
            return [v for v in sorted(available) if v in self.versions]
        return sorted(available)

    def __str__(self) -> str:
        if self.kind is PolicyKind.LATEST:
            return f"latest {self.count}"
        if self.kind is PolicyKind.SPECIFIC:
            return str(list(self.versions))
        return "all"


@dataclass
class VersionEntry:
    version: int
    directory: Path
    task: str | None = None
    state: ModelState = ModelState.UNAVAILABLE
    reason: str | None = "not loaded"
    current: Loaded | None = None
    """The servable answering this version's requests (READY), else None."""

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and self.current is not None

    @property
    def servable(self) -> Servable | None:
        return self.current.servable if self.current is not None else None


@dataclass
class ModelEntry:
    name: str
    directory: Path
    settings: Any = None
    """The ``ModelSettings`` of the last load (or scan), None when they are invalid."""
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    reason: str | None = None
    """A model-level problem (settings file, no versions), else None."""
    config_override: dict[str, Any] | None = None
    """Settings a load call gave in place of the config file (kept for later reloads by poll)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    """Serialises loads and unloads of this model."""

    @property
    def task(self) -> str | None:
        return next((v.task for v in self.versions.values() if v.task), None)
