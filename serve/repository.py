"""The model repository: ``<repository>/<model>/<version>/`` artifacts, each loaded as a ``Servable``, loaded,
reloaded and unloaded while the server runs.

Every version is checked (``ArtifactTrust``: the folder lies inside the repository and, with trusted keys, the
manifest is signed by one) and verified (``load_manifest(verify=True)``: every file's sha256) before it is
opened, so a tampered, unsigned, corrupt or half-copied artifact is never served: it marks only that version not
ready, with the reason in the index and the log, and whatever served before keeps serving. A reload opens and
warms the new servable beside the old one, switches requests to it at once, then drains the old one
(``model_state``). What requests read (which version they mean, the listings) is ``repository_index.py``'s.

``--model-control``: ``none`` loads every model at start; ``explicit`` only the ``load_models`` given; ``poll``
loads every model and rescans the repository every ``poll_interval_s`` (``poller.py``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from deepserve.manifest import Manifest, ManifestError, load_manifest
from deepserve.signing import ArtifactTrust
from deepserve.serve.backends import DeviceName, resolve_device
from deepserve.serve.errors import LoadFailed, NotFound, redact_paths
from deepserve.serve.heap import settle
from deepserve.serve.metrics import Metrics
from deepserve.serve.model_state import Loaded, ModelEntry, ModelState, VersionEntry
from deepserve.serve.poller import Poller
from deepserve.serve.preprocess import DEFAULT_MAX_PIXELS
from deepserve.serve.repository_index import RepositoryIndex
from deepserve.serve.servable import Servable
from deepserve.serve.settings import ModelSettings, SettingsError, env_overrides, resolve_settings

log = logging.getLogger("deepserve.serve")

ServableFactory = Callable[[Manifest, Path, ModelSettings, DeviceName], Servable]


class ModelControl(str, enum.Enum):
    """Which models load at start, and whether the repository is rescanned (Triton's model control modes)."""

    NONE = "none"
    EXPLICIT = "explicit"
    POLL = "poll"


class ModelRepository(RepositoryIndex):
    """Scans ``path`` at construction (cheap: directory listings); ``start()`` loads and warms up. What requests
    read (lookups, listings) is ``RepositoryIndex``'s."""

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
        model_control: ModelControl | str = ModelControl.NONE,
        load_models: Iterable[str] = (),
        poll_interval_s: float = 5.0,
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
        self.model_control = ModelControl(model_control)
        self.load_models = tuple(load_models)
        """``explicit``: the models loaded at start (``*``: all)."""
        self.ready = False
        """True once the start-up loads have finished (or failed); False again while stopping."""
        self.stopping = False
        self.models: dict[str, ModelEntry] = {}
        self._retiring: set[asyncio.Task] = set()
        self.poller = Poller(self, poll_interval_s) if self.model_control is ModelControl.POLL else None
        self.scan()

    def scan(self) -> None:
        """Find models and versions on disk. Known entries stay; versions and models gone from disk are
        dropped unless loaded (a load or poll unloads those)."""
        on_disk = {p.name: p for p in sorted(self.path.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        for name, model_dir in on_disk.items():
            entry = self.models.setdefault(name, ModelEntry(name, model_dir))
            found = {int(d.name): d for d in model_dir.iterdir()
                     if d.is_dir() and d.name.isdigit() and int(d.name) >= 1}
            for number, directory in found.items():
                entry.versions.setdefault(number, VersionEntry(number, directory))
            entry.versions = {n: v for n, v in sorted(entry.versions.items())
                              if n in found or v.current is not None or v.state is not ModelState.UNAVAILABLE}
            self._check_settings(entry)
        for name, entry in list(self.models.items()):
            if name not in on_disk and not any(v.current for v in entry.versions.values()):
                del self.models[name]
        self.metrics.set_models(self.models)

    def public_reason(self, reason: str) -> str:
        """``reason`` as answers show it: no filesystem paths (the log keeps the full text)."""
        text = redact_paths(reason, str(self.path.resolve()))
        return redact_paths(text, str(self.path)) if str(self.path) != str(self.path.resolve()) else text

    def _check_settings(self, model: ModelEntry) -> ModelSettings | None:
        """Resolve the model's settings now; a problem becomes the model's reason (and None)."""
        model.reason = None
        try:
            settings = resolve_settings(model.directory, self.overrides, model.config_override)
        except SettingsError as e:
            log.warning("model %s not ready: %s", model.name, e)
            model.reason = self.public_reason(str(e))
            return None
        if model.settings is None or not any(v.ready for v in model.versions.values()):
            model.settings = settings  # while versions serve, their settings stay those they were loaded with
        if not model.versions:
            model.reason = f"{model.name} has no version directories (<model>/<version>/manifest.json)"
        return settings

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, verify and warm up the models the control mode names (concurrently); failures only mark them."""
        self.device = resolve_device(self.device_request)
        names = list(self.models)
        if self.model_control is ModelControl.EXPLICIT and "*" not in self.load_models:
            names = [n for n in names if n in self.load_models]
            for m in (m for m in self.models.values() if m.name not in names):
                for v in m.versions.values():
                    v.reason = f"not loaded (--model-control explicit): load it with deepserve models load {m.name}"
        await asyncio.gather(*(self.load_quietly(n) for n in names))
        self.ready = True
        log.info("repository %s loaded: %s", self.path, self.summary())
        if self.poller is not None:
            self.poller.start()

    async def stop(self) -> None:
        """Drain every servable: finish queued and in-flight work, then release the graphs."""
        self.ready, self.stopping = False, True
        if self.poller is not None:
            await self.poller.stop()
        loaded = []
        for m in self.models.values():
            for v in m.versions.values():
                if v.current is not None:
                    loaded.append(v.current)
                    v.current = None
                    self._set(m.name, v, ModelState.UNLOADING, "stopping")  # new requests are refused
        await asyncio.gather(*(x.drain_and_stop() for x in loaded), *self._retiring, return_exceptions=True)
        for m in self.models.values():
            for v in m.versions.values():
                self._set(m.name, v, ModelState.UNAVAILABLE, "stopped")

    def _set(self, model: str, entry: VersionEntry, state: ModelState, reason: str | None) -> None:
        entry.state, entry.reason = state, None if reason is None else self.public_reason(reason)
        self.metrics.set_state(model, str(entry.version), state)

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

    # -- model control ---------------------------------------------------------------------------------------

    async def load_model(self, name: str, *, config: Mapping[str, Any] | None = None,
                         versions: Iterable[int] | None = None) -> None:
        """Load or reload ``name``: the versions its version policy selects (only ``versions`` of them, when
        given) are opened and warmed beside whatever serves now, then switched to; versions the policy no
        longer selects are drained and unloaded once a selected one is ready. ``config`` replaces the
        model's config file for this load (and later reloads). Raises ``NotFound`` or ``LoadFailed`` naming
        every failure; what served before keeps serving."""
        self.scan()
        model = self.model(name)
        async with model.lock:
            previous, model.config_override = model.config_override, (dict(config) if config is not None else None)
            settings = self._check_settings(model)
            if settings is None:
                raise self._refuse(model, previous, model.reason or "invalid settings")
            on_disk = [n for n, v in model.versions.items() if v.directory.is_dir()]
            wanted = settings.version_policy.select(on_disk)
            if not wanted:
                raise LoadFailed(f"model {name!r}: " + self._record_failure(
                    model, [], model.reason or f"version_policy {settings.version_policy} selects none of the "
                                               f"versions on disk {on_disk}"))
            refused = await self.before_load(model)
            if refused is not None:
                raise self._refuse(model, previous, refused)
            only = set(versions) if versions is not None else None
            targets = [model.versions[n] for n in wanted if only is None or n in only]
            failures = [f for f in await asyncio.gather(*(self._load_version(model, v, settings) for v in targets))
                        if f]
            if len(failures) < len(targets):
                model.settings = settings
            if any(model.versions[n].ready for n in wanted):
                self._retire_unwanted(model, wanted, settings)
        if self.ready:  # at run time: the new graphs leave the collector's generations, the old ones' cycles go
            settle()
        if failures:
            raise LoadFailed(f"model {name!r}: " + "; ".join(failures))

    async def before_load(self, model: ModelEntry) -> str | None:
        """Under the model's lock, once a load's settings are valid and before its versions open: what the
        engine must do first (Ray deploys the model's application). The reason it cannot, or None."""
        return None

    async def after_unload(self, model: ModelEntry) -> None:
        """Under the model's lock, once its versions are drained: what the engine releases (Ray deletes the
        model's application)."""

    def _refuse(self, model: ModelEntry, previous: dict[str, Any] | None, reason: str) -> LoadFailed:
        """A load that changes nothing: the previous config stays, the versions serving keep serving."""
        model.config_override = previous
        self._check_settings(model)
        return LoadFailed(f"model {model.name!r}: " + self._record_failure(model, model.versions.values(), reason))

    async def load_quietly(self, name: str, versions: Iterable[int] | None = None) -> None:
        """``load_model`` for start-up and polling (keeping a load call's config override): failures are
        recorded in the index and logged only."""
        try:
            await self.load_model(name, versions=versions, config=self.model(name).config_override)
        except (LoadFailed, NotFound) as e:
            log.warning("%s", e.message)

    async def unload_model(self, name: str) -> None:
        """Unload every version of ``name``: new requests are refused at once (503 naming the state), the
        requests in flight finish, then the servables are stopped and their memory freed."""
        model = self.model(name)
        async with model.lock:
            await self.unload_locked(model, "unloaded")
        settle()  # what the unloaded versions left in reference cycles is collected, not kept frozen

    async def unload_locked(self, model: ModelEntry, reason: str) -> None:
        """``unload_model``'s work, for a caller that holds the model's lock (an engine's ``before_load`` whose
        serving replicas are gone); ``reason`` is what the index says of the unloaded versions."""
        draining = [v for v in model.versions.values() if v.current is not None]
        retired = []
        for v in draining:
            retired.append(v.current)
            v.current = None
            self._set(model.name, v, ModelState.UNLOADING, "unload requested: finishing the requests in flight")
        results = await asyncio.gather(*(x.drain_and_stop() for x in retired), return_exceptions=True)
        for v, result in zip(draining, results):
            if isinstance(result, BaseException):
                log.warning("stopping %s/%d: %s", model.name, v.version, result)
            self._set(model.name, v, ModelState.UNAVAILABLE, reason)
        if draining:
            self.metrics.observe_unload(model.name)
            log.info("model %s unloaded (versions %s): %s", model.name, [v.version for v in draining], reason)
        await self.after_unload(model)

    async def _load_version(self, model: ModelEntry, entry: VersionEntry, settings: ModelSettings) -> str | None:
        """(Re)load one version beside what serves it now; the failure's text, or None."""
        assert self.device is not None, "start() resolves the device before anything loads"
        if entry.current is None:
            self._set(model.name, entry, ModelState.LOADING, "loading")
        else:
            entry.reason = "reloading: the loaded servable keeps serving until the new one is ready"
        started = time.perf_counter()
        try:
            servable = await self._open(model.name, entry, settings)
        except Exception as e:  # any failure is this version's alone: record it, keep serving what serves
            reason = str(e) if isinstance(e, ManifestError) else f"{type(e).__name__}: {e}"
            self.metrics.observe_load(model.name, False, time.perf_counter() - started)
            return f"version {entry.version}: {self._record_failure(model, [entry], reason)}"
        old, entry.current = entry.current, Loaded(servable)
        self._set(model.name, entry, ModelState.READY, None)
        self.metrics.observe_load(model.name, True, time.perf_counter() - started)
        log.info("model %s version %d %s (%s)", model.name, entry.version, "reloaded" if old else "ready",
                 servable.platform)
        if old is not None:
            self._retire(old)
        return None

    async def _open(self, name: str, entry: VersionEntry, settings: ModelSettings) -> Servable:
        """Verify, open, start and warm up one artifact; on failure the half-started servable is stopped."""
        assert self.device is not None
        await asyncio.to_thread(self.trust.check, entry.directory, self.path)
        manifest = await asyncio.to_thread(load_manifest, entry.directory, verify=True)
        entry.task = manifest.task
        if manifest.version != entry.version:
            raise ManifestError(f"manifest.json says version {manifest.version} but it sits in "
                                f"{entry.directory}; move it or re-export")
        servable = self.servable_factory(manifest, entry.directory, settings, self.device)
        try:
            await servable.start()
            await servable.warmup()
            if not servable.ready:
                raise RuntimeError(servable.reason or "not ready after warmup")
        except BaseException:
            try:
                await servable.stop()
            except Exception as stop_error:  # already failing: log, keep the first reason
                log.warning("stopping %s/%d after failure: %s", name, entry.version, stop_error)
            raise
        return servable

    def _record_failure(self, model: ModelEntry, entries: Iterable[VersionEntry], reason: str) -> str:
        """Mark a failed load in the index: a version that serves keeps serving, with the failure as its reason.
        Returns the reason as answers show it (the log keeps its paths)."""
        for entry in entries:
            if entry.current is not None:
                self._set(model.name, entry, ModelState.READY,
                          f"last load failed, the previous load keeps serving: {reason}")
            else:
                self._set(model.name, entry, ModelState.UNAVAILABLE, reason)
            log.warning("model %s version %d not loaded: %s", model.name, entry.version, reason)
        if not model.versions:
            log.warning("model %s not loaded: %s", model.name, reason)
        return self.public_reason(reason)

    def _retire_unwanted(self, model: ModelEntry, wanted: list[int], settings: ModelSettings) -> None:
        for entry in model.versions.values():
            if entry.version not in wanted and entry.current is not None:
                self._retire(entry.current)
                entry.current = None
                gone = not entry.directory.is_dir()
                self._set(model.name, entry, ModelState.UNAVAILABLE, "removed from the repository" if gone else
                          f"not selected by version_policy {settings.version_policy}")

    def _retire(self, loaded: Loaded) -> None:
        """Drain and stop ``loaded`` in the background (it is no longer handed out)."""
        task = asyncio.get_running_loop().create_task(loaded.drain_and_stop())
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("stopping a replaced servable failed: %s", task.exception())

    async def drained(self) -> None:
        """Wait until every replaced servable has been stopped (tests, shutdown)."""
        await asyncio.gather(*self._retiring, return_exceptions=True)
