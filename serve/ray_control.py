"""The ingress's model repository under Ray: loading a model deploys its Ray Serve application (one
``ModelReplica`` deployment, replicas from the ``ray`` section of its config), unloading deletes it. Ray places,
replicates and restarts the replicas; the repository keeps the plain server's index, states, reasons, model
control routes and ``--model-control`` modes, over ``RemoteServable``s that stand for the replicas.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from deepserve.manifest import Manifest
from deepserve.serve.errors import BadRequest
from deepserve.serve.model_state import ModelEntry
from deepserve.serve.ray_app import model_options
from deepserve.serve.ray_replica import ModelReplica, ReplicaStartFailed, ServingOptions, model_app
from deepserve.serve.repository import ModelRepository
from deepserve.serve.servable import Servable
from deepserve.serve.settings import SettingsError

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
        self.deployed: dict[str, Any] = {}
        """Model -> the application this ingress last deployed for it and saw start (what a failed redeploy
        goes back to)."""

    def _remote(self, manifest: Manifest, directory: Path, settings: Any, device: str) -> Servable:
        return RemoteServable(manifest, directory, settings, self.handles.get(Path(directory).parent.name))

    async def load_model(self, name: str, *, config: Mapping[str, Any] | None = None,
                         versions: Iterable[int] | None = None) -> None:
        """Deploy (or redeploy) ``name``'s application, then load its versions from the replicas, all under
        the model's lock (``before_load``). At start-up an application that is already running (the ingress
        restarted) is kept as it is."""
        if config is not None and "ray" in config:
            raise BadRequest("parameters.config: replicas and resources come from the ray section of the model's "
                             "config file; edit it and load the model again")
        await super().load_model(name, config=config, versions=versions)

    async def before_load(self, model: ModelEntry) -> str | None:
        """Deploy the model's application with its settings, checked already: a bad config must not roll the
        serving replicas over to ones that load nothing. On failure what served before keeps serving."""
        try:
            await self._deploy(model)
        except DEPLOY_ERRORS as e:
            return str(e)  # one line: _run says why Ray failed it
        return None

    async def after_unload(self, model: ModelEntry) -> None:
        """Delete the application: Ray drains each replica (the requests in flight finish, up to
        ``graceful_shutdown_timeout_s``) before it stops."""
        self.deployed.pop(model.name, None)
        if self.handles.pop(model.name, None) is not None:
            await asyncio.to_thread(serve.delete, model_app(model.name))

    async def _deploy(self, model: ModelEntry) -> None:
        """Deploy the model's application with its config file's ray section and its load's config, unless the
        ingress is starting and it runs already; then take its handle."""
        options = model_options(model.directory)
        app_name = model_app(model.name)
        listed = (await asyncio.to_thread(serve.status)).applications.get(app_name)
        # one Ray is deleting (a first deploy given up on) serves nothing: this load replaces nothing there
        running = listed is not None and listed.status != ApplicationStatus.DELETING
        if not (running and not self.ready):
            config = model.config_override
            app = ModelReplica.options(name=model.name, graceful_shutdown_timeout_s=self.options.graceful_timeout_s,
                                       **options.deployment_options()).bind(
                str(self.path.resolve()), model.name, self.options, dict(config) if config is not None else None)
            try:
                await self._run(model.name, app, options.start_timeout_s, replacing=running)
            except DEPLOY_ERRORS:
                # Ray's rollout may have stopped serving replicas for ones that never started: go back to the
                # last deploy that started, so that what the index keeps serving is what Ray serves
                previous = self.deployed.get(model.name) if running else None
                if previous is not None:
                    await self._run(model.name, previous, options.start_timeout_s, replacing=True)
                raise
            self.deployed[model.name] = app
        self.handles[model.name] = serve.get_deployment_handle(model.name, app_name=app_name)

    async def _run(self, name: str, app: Any, timeout_s: float, *, replacing: bool) -> None:
        """Deploy ``app`` and wait up to ``timeout_s`` for its replicas. On failure Ray's reason is raised and a
        first deploy leaves no application behind."""
        app_name = model_app(name)
        deploying = asyncio.ensure_future(asyncio.to_thread(serve.run, app, name=app_name, route_prefix=None))
        deploying.add_done_callback(_consume)  # a wait given up on still ends, later
        try:
            await asyncio.wait_for(asyncio.shield(deploying), timeout_s)
        except BaseException as e:
            said = "" if isinstance(e, asyncio.CancelledError) else await _status_message(app_name)
            if not replacing:  # the index will show it unloaded: so must Ray (serve.run's wait ends with it)
                self.handles.pop(name, None)
                pending = isinstance(e, (TimeoutError, asyncio.CancelledError))  # Ray would give such a replica,
                await asyncio.to_thread(serve.delete, app_name, _blocking=not pending)  # which never served, its
                # graceful_shutdown_timeout_s to drain: the load answers now, Ray stops it soon after
            if isinstance(e, TimeoutError):
                raise TimeoutError(f"its replicas did not start within {timeout_s:g} s (not placed, or still "
                                   f"loading): {deploy_failure(said) if said else 'Ray gives no reason yet'}") from None
            if isinstance(e, DEPLOY_ERRORS):
                why = deploy_failure("\n".join((str(e), said)))
                raise RuntimeError(f"its replicas failed to start: {why}") from None
            raise


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _status_message(app_name: str) -> str:
    """What Ray says of the application's deployments (why a replica is pending, or failed to start)."""
    app = (await asyncio.to_thread(serve.status)).applications.get(app_name)
    return "\n".join(d.message for d in app.deployments.values() if d.message) if app else ""


def deploy_failure(text: str) -> str:
    """Why a deploy failed, in one line: the replica's own ``ReplicaStartFailed`` message when Ray's text (its
    status and the constructor's traceback) has one, else that text's last line."""
    found = re.findall(rf"{ReplicaStartFailed.__name__}: (.+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return found[-1] if found else (lines[-1] if lines else "the deploy failed")
