"""The ingress's model repository under Ray: loading a model deploys its Ray Serve application (one
``ModelReplica`` deployment, replicas from the ``ray`` section of its config), unloading deletes it. Ray places,
replicates and restarts the replicas; the repository keeps the plain server's index, states, reasons, model
control routes and ``--model-control`` modes, over ``RemoteServable``s that stand for the replicas.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterable, Mapping

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deepserve.manifest import Manifest
from deepserve.serve.errors import BadRequest, LoadFailed
from deepserve.serve.ray_app import model_options
from deepserve.serve.ray_replica import ModelReplica, ServingOptions, model_app
from deepserve.serve.repository import ModelRepository
from deepserve.serve.servable import Servable
from deepserve.serve.settings import SettingsError, resolve_settings

DEPLOY_ERRORS = (SettingsError, RayServeException, RuntimeError, ValueError, TimeoutError)
"""What a deploy raises for a bad ``ray`` section or an application Ray could not start (its message says why)."""


class RemoteServable(Servable):
    """A model version served by a deployment's replicas; ready when they report it ready."""

    def __init__(self, manifest: Manifest, directory: Path, settings: Any, handle: DeploymentHandle | None) -> None:
        self.manifest, self.directory, self.settings = manifest, Path(directory), settings
        self.handle = handle
        self.ready, self.reason = False, "not started"
        self._metadata: dict[str, Any] = {}

    async def start(self) -> None:
        if self.handle is None:
            raise RuntimeError("no Ray deployment for this model")
        status = (await self.handle.describe.remote()).get(self.manifest.version)
        if status is None or not status["ready"]:
            raise RuntimeError(status["reason"] if status else "the replica does not serve this version")
        self._metadata = status["metadata"]

    async def warmup(self) -> None:
        self.ready, self.reason = True, None  # the replicas warmed up before they answered ``describe``

    async def stop(self) -> None:
        self.ready, self.reason = False, "stopped"

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    @property
    def platform(self) -> str:
        return self._metadata.get("platform", "deepserve")


class RayModelRepository(ModelRepository):
    """``ModelRepository`` whose loads deploy Ray Serve applications and whose unloads delete them."""

    def __init__(self, path: Path | str, options: ServingOptions, **control: Any) -> None:
        # The ingress runs no model: it verifies manifests and asks the replicas, so it needs no GPU.
        super().__init__(path, overrides=options.overrides, device="cpu", servable_factory=self._remote,
                         max_pixels=options.max_pixels, trust=options.trust, **control)
        self.options = options
        self.handles: dict[str, DeploymentHandle] = {}
        """Model -> its deployment's handle, while its application is deployed."""

    def _remote(self, manifest: Manifest, directory: Path, settings: Any, device: str) -> Servable:
        return RemoteServable(manifest, directory, settings, self.handles.get(Path(directory).parent.name))

    async def load_model(self, name: str, *, config: Mapping[str, Any] | None = None,
                         versions: Iterable[int] | None = None) -> None:
        """Deploy (or redeploy) ``name``'s application, then load its versions from the replicas. At start-up
        an application that is already running (the ingress restarted) is kept as it is."""
        self.scan()
        model = self.model(name)
        if config is not None and "ray" in config:
            raise BadRequest("parameters.config: replicas and resources come from the ray section of the model's "
                             "config file; edit it and load the model again")
        try:  # settings first: a bad config must not roll the serving replicas over to ones that load nothing
            resolve_settings(model.directory, self.overrides, config)
            await asyncio.to_thread(self._deploy, name, config, keep_running=not self.ready)
        except DEPLOY_ERRORS as e:  # what served before (its application, its handle) keeps serving
            reason = self.public_reason(str(e))
            raise LoadFailed(f"model {name!r}: " + self._record_failure(model, model.versions.values(), reason))
        await super().load_model(name, config=config, versions=versions)

    async def unload_model(self, name: str) -> None:
        """Stop routing to ``name``, then delete its application: Ray drains each replica (the requests in
        flight finish, up to ``graceful_shutdown_timeout_s``) before it stops."""
        await super().unload_model(name)
        if self.handles.pop(name, None) is not None:
            await asyncio.to_thread(serve.delete, model_app(name))

    def _deploy(self, name: str, config: Mapping[str, Any] | None, *, keep_running: bool) -> None:
        """Deploy the model's application with its config file's ray section and ``config`` (None: the file's
        settings), unless ``keep_running`` and it runs already; then take its handle."""
        options = model_options(self.path / name)
        app_name = model_app(name)
        if not (keep_running and app_name in serve.status().applications):
            app = ModelReplica.options(name=name, graceful_shutdown_timeout_s=self.options.graceful_timeout_s,
                                       **options.deployment_options()).bind(
                str(self.path.resolve()), name, self.options, dict(config) if config is not None else None)
            serve.run(app, name=app_name, route_prefix=None)  # returns once its replicas are up
        self.handles[name] = serve.get_deployment_handle(name, app_name=app_name)
