"""What requests and the index routes read from the model repository: which version a request means, its ready
servable (held for the request), and the listings (``GET /v2/models``, Triton's repository index). These only
read the models' entries; loads, unloads and scans change them (``repository.py``).

Requests that name no version get the model's ``default_version`` or, without one, its newest ready version.
"""

from __future__ import annotations

from typing import Any

from deepserve.serve.errors import NotFound, NotReady, ServeError
from deepserve.serve.model_state import ModelEntry, ModelState, VersionEntry, lease
from deepserve.serve.servable import Servable


class RepositoryIndex:
    """Lookups and listings over ``models``; the repository (``ModelRepository``) fills and changes them."""

    models: dict[str, ModelEntry]

    def scan(self) -> None:
        """Bring ``models`` up to date with the disk (the repository's); the Triton index lists what it finds."""
        raise NotImplementedError

    # -- lookup ----------------------------------------------------------------------------------------------

    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"unknown model {name!r}; this repository has {sorted(self.models)}")
        return entry

    def resolve(self, name: str, version: int | str | None = None) -> VersionEntry:
        """The entry a request for ``name`` (and ``version``) means, ready or not."""
        model = self.model(name)
        if version is None or version == "":
            if model.settings and model.settings.default_version is not None:
                version = model.settings.default_version
            else:
                ready = [v for v in model.versions.values() if v.ready]
                if ready:
                    return ready[-1]
                states = "; ".join(f"version {v.version} {v.state.value}: {v.reason}" for v in model.versions.values())
                raise NotReady(f"model {name!r} has no ready version ({states or model.reason})")
        try:
            number = int(version)
        except (TypeError, ValueError):
            raise NotFound(f"model {name!r} has no version {version!r}; versions are positive integers") from None
        entry = model.versions.get(number)
        if entry is None:
            raise NotFound(f"model {name!r} has no version {number}; it has {sorted(model.versions)}")
        return entry

    def get(self, name: str, version: int | str | None = None) -> Servable:
        """The ready servable for ``name``/``version``, held by the current request until it is answered;
        raises ``NotFound`` or ``NotReady`` (naming the version's state)."""
        entry = self.resolve(name, version)
        loaded = entry.current
        if entry.state is not ModelState.READY or loaded is None:
            raise NotReady(f"model {name!r} version {entry.version} is {entry.state.value}: {entry.reason}",
                           headers={"Retry-After": "5"} if entry.state is ModelState.LOADING else None)
        lease(loaded)
        return loaded.servable

    def is_ready(self, name: str, version: int | str | None = None) -> bool:
        try:
            entry = self.resolve(name, version)
        except ServeError:
            return False
        return entry.ready

    # -- listings --------------------------------------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        """``GET /v2/models``: every model found, ready or not, with the reasons."""
        models = []
        for m in self.models.values():
            problems = [f"version {v.version}: {v.reason}" for v in m.versions.values() if not v.ready and v.reason]
            models.append({
                "name": m.name,
                "versions": [str(v) for v in m.versions],
                "ready": self.is_ready(m.name) if m.versions else False,
                "reason": m.reason or ("; ".join(problems) if problems else None),
                "task": m.task,
                "version_status": [{"version": str(v.version), "ready": v.ready, "reason": v.reason,
                                    "state": v.state.value} for v in m.versions.values()],
            })
        return {"models": models}

    def triton_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """``POST /v2/repository/index`` in Triton's shape: one row per model version found, loaded or not."""
        self.scan()
        rows = []
        for m in self.models.values():
            if not m.versions and not ready_only:
                rows.append({"name": m.name, "version": "", "state": ModelState.UNAVAILABLE.value,
                             "reason": m.reason or ""})
            for v in m.versions.values():
                if v.ready or not ready_only:
                    rows.append({"name": m.name, "version": str(v.version), "state": v.state.value,
                                 "reason": v.reason or m.reason or ""})
        return rows

    def summary(self) -> str:
        parts = [f"{m.name}/{v.version} {v.state.value}" for m in self.models.values() for v in m.versions.values()]
        return ", ".join(parts) or "no models"
