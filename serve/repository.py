"""The model repository: ``<repository>/<model>/<version>/`` artifacts, each loaded as a ``Servable``.

Every version is verified (``load_manifest(verify=True)``: every file's sha256; before that ``ArtifactTrust``:
the folder lies inside the repository and, with trusted keys, the manifest is signed by one) before it is opened. A
tampered, corrupt or unsupported artifact marks only that model/version not ready, with the reason in the
index and the log; the rest serve. Requests that name no version get the model's ``default_version`` or,
without one, its latest ready version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from deepserve.manifest import Manifest, ManifestError, load_manifest
from deepserve.signing import ArtifactTrust
from deepserve.serve.backends import DeviceName, resolve_device
from deepserve.serve.errors import NotFound, NotReady, ServeError
from deepserve.serve.metrics import Metrics
from deepserve.serve.preprocess import DEFAULT_MAX_PIXELS
from deepserve.serve.servable import Servable
from deepserve.serve.settings import ModelSettings, SettingsError, env_overrides, resolve_settings

log = logging.getLogger("deepserve.serve")

ServableFactory = Callable[[Manifest, Path, ModelSettings, DeviceName], Servable]


@dataclass
class VersionEntry:
    version: int
    directory: Path
    task: str | None = None
    servable: Servable | None = None
    ready: bool = False
    reason: str | None = "loading"


@dataclass
class ModelEntry:
    name: str
    directory: Path
    settings: ModelSettings | None = None
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    reason: str | None = None
    """A model-level problem (settings file, no versions), else None."""

    @property
    def task(self) -> str | None:
        return next((v.task for v in self.versions.values() if v.task), None)


class ModelRepository:
    """Scans ``path`` at construction (cheap: directory listings); ``start()`` loads and warms up."""

    def __init__(
        self,
        path: Path | str,
        *,
        overrides: Mapping[str, Any] | None = None,
        device: str = "auto",
        servable_factory: ServableFactory | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        metrics: Metrics | None = None,
        use_env: bool = True,
        trust: ArtifactTrust | None = None,
    ) -> None:
        self.path = Path(path)
        self.trust = trust or ArtifactTrust()  # default: no keys required, folders symlinked out refused
        if not self.path.is_dir():
            raise FileNotFoundError(f"model repository {self.path} is not a directory")
        self.overrides = {**(env_overrides() if use_env else {}), **{k: v for k, v in (overrides or {}).items()
                                                                       if v is not None}}
        self.device_request = device
        self.device: DeviceName | None = None
        self.servable_factory = servable_factory or self._default_factory
        self.max_pixels = max_pixels
        self.metrics = metrics or Metrics()
        self.ready = False
        """True once every version has been loaded (or failed) and warmed up; False again while stopping."""
        self.stopping = False
        self.models: dict[str, ModelEntry] = {}
        self.scan()

    def scan(self) -> None:
        for model_dir in sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = ModelEntry(model_dir.name, model_dir)
            try:
                entry.settings = resolve_settings(model_dir, self.overrides)
            except SettingsError as e:
                entry.reason = str(e)
            for version_dir in model_dir.iterdir():
                if version_dir.is_dir() and version_dir.name.isdigit() and int(version_dir.name) >= 1:
                    entry.versions[int(version_dir.name)] = VersionEntry(int(version_dir.name), version_dir)
            entry.versions = dict(sorted(entry.versions.items()))
            if not entry.versions and entry.reason is None:
                entry.reason = f"{model_dir} has no version directories (<model>/<version>/manifest.json)"
            for v in entry.versions.values():
                if entry.reason:
                    v.reason = entry.reason
            self.models[entry.name] = entry

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, verify and warm up every version (concurrently); failures only mark that version."""
        self.device = resolve_device(self.device_request)
        jobs = [self._load(m, v) for m in self.models.values() if m.settings for v in m.versions.values()]
        await asyncio.gather(*jobs)
        for model in self.models.values():
            if model.reason:
                log.warning("model %s not ready: %s", model.name, model.reason)
        self.ready = True
        log.info("repository %s loaded: %s", self.path, self.summary())

    async def stop(self) -> None:
        """Drain every servable: finish queued and in-flight work, then release the graphs."""
        self.ready, self.stopping = False, True
        servables = []
        for m in self.models.values():
            for v in m.versions.values():
                if v.servable is not None:
                    servables.append(v.servable)
                    self._set(m.name, v, False, "stopping")  # new requests are refused from now on
        await asyncio.gather(*(s.stop() for s in servables), return_exceptions=True)
        for m in self.models.values():
            for v in m.versions.values():
                self._set(m.name, v, False, "stopped")

    def _set(self, model: str, entry: VersionEntry, ready: bool, reason: str | None) -> None:
        entry.ready, entry.reason = ready, reason
        self.metrics.set_ready(model, str(entry.version), ready)

    def _default_factory(self, manifest: Manifest, directory: Path, settings: ModelSettings,
                         device: DeviceName) -> Servable:
        if manifest.task == "image-classification":
            from deepserve.serve.classifier import ClassificationServable

            return ClassificationServable(manifest, directory, settings, device, metrics=self.metrics,
                                          max_pixels=self.max_pixels)
        try:
            from deepserve.serve.generation.engine import GenerationServable
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("deepserve.serve.generation"):
                raise RuntimeError(f"the generation engine is not available in this build ({e})") from None
            raise
        return GenerationServable(manifest, directory, settings, device)

    async def _load(self, model: ModelEntry, entry: VersionEntry) -> None:
        assert model.settings is not None and self.device is not None
        self._set(model.name, entry, False, "loading")
        servable = None
        try:
            await asyncio.to_thread(self.trust.check, entry.directory, self.path)
            manifest = await asyncio.to_thread(load_manifest, entry.directory, verify=True)
            entry.task = manifest.task
            if manifest.version != entry.version:
                raise ManifestError(f"manifest.json says version {manifest.version} but it sits in "
                                    f"{entry.directory}; move it or re-export")
            servable = self.servable_factory(manifest, entry.directory, model.settings, self.device)
            entry.servable = servable
            await servable.start()
            await servable.warmup()
            if not servable.ready:
                raise RuntimeError(servable.reason or "not ready after warmup")
        except Exception as e:  # any failure is this version's alone: record it, keep serving the others
            reason = str(e) if isinstance(e, ManifestError) else f"{type(e).__name__}: {e}"
            log.warning("model %s version %d not ready: %s", model.name, entry.version, reason)
            self._set(model.name, entry, False, reason)
            if servable is not None:
                entry.servable = None
                try:
                    await servable.stop()
                except Exception as stop_error:  # already failing: log, keep the first reason
                    log.warning("stopping %s/%d after failure: %s", model.name, entry.version, stop_error)
            return
        self._set(model.name, entry, True, None)
        log.info("model %s version %d ready (%s)", model.name, entry.version, servable.platform)

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
                reasons = "; ".join(f"version {v.version}: {v.reason}" for v in model.versions.values())
                raise NotReady(f"model {name!r} has no ready version ({reasons or model.reason})")
        try:
            number = int(version)
        except (TypeError, ValueError):
            raise NotFound(f"model {name!r} has no version {version!r}; versions are positive integers") from None
        entry = model.versions.get(number)
        if entry is None:
            raise NotFound(f"model {name!r} has no version {number}; it has {sorted(model.versions)}")
        return entry

    def get(self, name: str, version: int | str | None = None) -> Servable:
        """The ready servable for ``name``/``version``; raises ``NotFound`` or ``NotReady``."""
        entry = self.resolve(name, version)
        if not entry.ready or entry.servable is None:
            raise NotReady(f"model {name!r} version {entry.version} is not ready: {entry.reason}",
                           headers={"Retry-After": "5"} if entry.reason == "loading" else None)
        return entry.servable

    def is_ready(self, name: str, version: int | str | None = None) -> bool:
        try:
            self.get(name, version)
        except ServeError:
            return False
        return True

    # -- listings --------------------------------------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        """``GET /v2/models``: every model found, ready or not, with the reasons."""
        models = []
        for m in self.models.values():
            problems = [f"version {v.version}: {v.reason}" for v in m.versions.values() if not v.ready and v.reason]
            ready = self.is_ready(m.name) if m.versions else False
            models.append({
                "name": m.name,
                "versions": [str(v) for v in m.versions],
                "ready": ready,
                "reason": m.reason or ("; ".join(problems) if problems else None),
                "task": m.task,
                "version_status": [{"version": str(v.version), "ready": v.ready, "reason": v.reason}
                                   for v in m.versions.values()],
            })
        return {"models": models}

    def triton_index(self) -> list[dict[str, Any]]:
        """``POST /v2/repository/index`` in Triton's shape: one row per model version."""
        rows = []
        for m in self.models.values():
            if not m.versions:
                rows.append({"name": m.name, "version": "", "state": "UNAVAILABLE", "reason": m.reason or ""})
            for v in m.versions.values():
                state = "READY" if v.ready else ("LOADING" if v.reason == "loading" else "UNAVAILABLE")
                rows.append({"name": m.name, "version": str(v.version), "state": state, "reason": v.reason or ""})
        return rows

    def summary(self) -> str:
        parts = [f"{m.name}/{v.version} {'ready' if v.ready else 'NOT READY'}"
                 for m in self.models.values() for v in m.versions.values()]
        return ", ".join(parts) or "no models"
