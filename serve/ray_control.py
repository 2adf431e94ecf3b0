"""The ingress's model repository under Ray: loading a model deploys its Ray Serve application (one
``ModelReplica`` deployment, replicas from the ``ray`` section of its config), unloading deletes it. Ray places,
replicates and restarts the replicas; the repository keeps the plain server's index, states, reasons, model
control routes and ``--model-control`` modes, over ``RemoteServable``s that stand for the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from deepserve.manifest import Manifest
from deepserve.serve.errors import BadRequest
from deepserve.serve.model_state import ModelEntry
from deepserve.serve.ray_app import model_options
from deepserve.serve.ray_replica import ModelReplica, ReplicaStartFailed, ServingOptions, model_app
from deepserve.serve.repository import ModelControl, ModelRepository
from deepserve.serve.servable import Servable
from deepserve.serve.settings import SettingsError

log = logging.getLogger("deepserve.serve")

DEPLOY_ERRORS = (SettingsError, RayServeException, RuntimeError, ValueError, TimeoutError, asyncio.TimeoutError)
"""What a deploy raises for a bad ``ray`` section or an application Ray could not start (its message says why)."""
START_POLL_S = 0.2
"""How often a deploy's wait reads Ray's status of the application."""


class RollbackFailed(RuntimeError):
    """A redeploy failed, and putting the last deploy that started back failed too: Ray serves none of the model."""


@dataclass(frozen=True)
class Deployed:
    """A model's application as this ingress deploys it, and how long its replicas may take to start."""

    app: Any  # ray.serve.Application
    start_timeout_s: float


class RemoteServable(Servable):
    """A model version served by a deployment's replicas; ready when they report it ready."""

    def __init__(self, manifest: Manifest, directory: Path, settings: Any, handle: DeploymentHandle | None,
                 start_timeout_s: float) -> None:
        self.manifest, self.directory, self.settings = manifest, Path(directory), settings
        self.handle, self.start_timeout_s = handle, start_timeout_s
        self.ready, self.reason = False, "not started"
        self._metadata: dict[str, Any] = {}

    async def start(self) -> None:
        if self.handle is None:
            raise RuntimeError("no Ray deployment for this model")
        try:  # a replica Ray cannot place would keep this waiting forever
            described = await asyncio.wait_for(self.handle.describe.remote(), self.start_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11, two before
            raise RuntimeError(f"no replica answered within {self.start_timeout_s:g} s") from None
        status = described.get(self.manifest.version)
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
        self.deployed: dict[str, Deployed] = {}
        """Model -> the application this ingress last deployed for it and saw start, or found running at start
        (what a failed redeploy goes back to)."""
        self.deleting: dict[str, asyncio.Future[None]] = {}
        """Model -> its application's delete sent on a thread of its own, until Ray has done it."""

    def _remote(self, manifest: Manifest, directory: Path, settings: Any, device: str) -> Servable:
        name = Path(directory).parent.name
        deployed = self.deployed.get(name)  # (without it there is no handle either: start says so at once)
        return RemoteServable(manifest, directory, settings, self.handles.get(name),
                              deployed.start_timeout_s if deployed else 0.0)

    async def start(self) -> None:
        """Load the models the control mode names and, after an ingress restart, every model whose application
        Ray runs (status RUNNING): it is adopted as it runs (``_deploy``), so the index says what Ray serves and an
        unload deletes it. An application of a model not loaded here that Ray has not started is deleted (nobody
        asked for it any more)."""
        if self.model_control is ModelControl.EXPLICIT and "*" not in self.load_models:
            applications = (await asyncio.to_thread(serve.status)).applications
            for name in self.models:
                app = applications.get(model_app(name))
                if name in self.load_models or not _exists(app):
                    continue
                if _serving(app):
                    self.load_models = (*self.load_models, name)
                else:
                    self._delete_soon(name)
        await super().start()

    async def stop(self) -> None:
        """Stop serving, then wait for the deletes sent on threads of their own: Ray has them all when this ends."""
        await super().stop()
        await asyncio.gather(*(asyncio.shield(d) for d in list(self.deleting.values())))

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
        serving replicas over to ones that load nothing. On failure what served before keeps serving, unless
        putting it back failed too: then the model is unloaded here, under the lock its load holds."""
        try:
            await self._deploy(model)
        except RollbackFailed as e:  # nothing of the model serves: the index says so, and Ray drops the application
            self._delete_soon(model.name)
            await self.unload_locked(model, str(e))
            return str(e)
        except DEPLOY_ERRORS as e:
            return str(e)  # one line: _run says why Ray failed it
        return None

    async def after_unload(self, model: ModelEntry) -> None:
        """Delete the application: Ray drains each replica (the requests in flight finish, up to
        ``graceful_shutdown_timeout_s``) before it stops."""
        self.deployed.pop(model.name, None)
        self.handles.pop(model.name, None)
        if model.name in self.deleting:
            return  # a thread of its own deletes it already (the answer need not wait for that)
        # an adopted application whose settings no longer load has no handle here, but Ray runs it
        if _exists((await asyncio.to_thread(serve.status)).applications.get(model_app(model.name))):
            await asyncio.to_thread(serve.delete, model_app(model.name))

    async def _deploy(self, model: ModelEntry) -> None:
        """Deploy the model's application with its config file's ray section and its load's config, unless the
        ingress is starting and Ray serves it already (the ingress restarted: it is kept, and recorded as this
        ingress deploys it, which a failed redeploy goes back to); then take its handle. A delete of it still
        under way ends first, so it cannot delete this deploy."""
        options = model_options(model.directory)
        app_name = model_app(model.name)
        await self._deleted(model.name)
        app = (await asyncio.to_thread(serve.status)).applications.get(app_name)
        # at start only a serving application is adopted: one Ray is still placing or failed goes through _run
        # (bounded by start_timeout_s), which deletes it if it fails; a redeploy replaces whatever Ray has
        adopt, replacing = not self.ready and _serving(app), self.ready and _exists(app)
        config = model.config_override
        this = Deployed(ModelReplica.options(
            name=model.name, graceful_shutdown_timeout_s=self.options.graceful_timeout_s,
            **options.deployment_options()).bind(str(self.path.resolve()), model.name, self.options,
                                                 dict(config) if config is not None else None),
            options.start_timeout_s)
        if not adopt:
            try:
                await self._run(model.name, this, replacing=replacing)
            except DEPLOY_ERRORS as e:
                previous = self.deployed.get(model.name) if replacing else None
                if previous is not None:
                    await self._roll_back(model.name, previous, e)
                raise
        self.deployed[model.name] = this
        self.handles[model.name] = serve.get_deployment_handle(model.name, app_name=app_name)

    async def _roll_back(self, name: str, previous: Deployed, failure: BaseException) -> None:
        """Ray's rollout may have stopped serving replicas for ones that never started: go back to the last deploy
        that started, so that what the index keeps serving is what Ray serves. If that fails too,
        ``RollbackFailed`` names the redeploy's ``failure`` first (the reason the caller asked about)."""
        try:
            await self._run(name, previous, replacing=True)
        except DEPLOY_ERRORS as e:
            raise RollbackFailed(f"{failure}; putting the last deploy that started back failed too ({e}), so the "
                                 f"model is unloaded") from None

    async def _run(self, name: str, deploy: Deployed, *, replacing: bool) -> None:
        """Deploy and wait up to its ``start_timeout_s`` for its replicas. On failure Ray's reason is raised and a
        first deploy leaves no application behind."""
        app_name, timeout_s = model_app(name), deploy.start_timeout_s
        # serve.run's own wait is unbounded (after a delete, endless): a thread left in it keeps the process's Ray
        # connection after ray.shutdown, and that ends the process once the cluster is gone; so Ray only takes the
        # deploy (a call that ends), and the wait for its replicas is this task's, bounded and cancelled with it
        target = serve.RunTarget(target=deploy.app, name=app_name, route_prefix=None)
        deploying = asyncio.ensure_future(asyncio.to_thread(
            serve.run_many, [target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False))
        deploying.add_done_callback(_consume)  # a wait given up on leaves no unretrieved exception behind
        try:
            await asyncio.wait_for(_started(app_name, deploying), timeout_s)
        except BaseException as e:
            said = "" if isinstance(e, asyncio.CancelledError) else await _status_message(app_name)
            if not replacing:  # the index will show it unloaded: so must Ray
                if isinstance(e, (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError)):  # Ray would give
                    self._delete_soon(name, after=deploying)  # such a replica, which never served, its
                    # graceful_shutdown_timeout_s to drain: answer now
                else:
                    self.handles.pop(name, None)
                    await asyncio.to_thread(serve.delete, app_name)
            if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
                raise TimeoutError(f"its replicas did not start within {timeout_s:g} s (not placed, or still "
                                   f"loading): {deploy_failure(said) if said else 'Ray gives no reason yet'}") from None
            if isinstance(e, DEPLOY_ERRORS):
                why = deploy_failure("\n".join((str(e), said)))
                raise RuntimeError(f"its replicas failed to start: {why}") from None
            raise

    def _delete_soon(self, name: str, *, after: asyncio.Future[Any] | None = None) -> None:
        """Have Ray delete the model's application, without waiting for its replicas to stop: they serve nothing.
        (Serve's public ``delete`` waits for that, so it runs on a thread of its own, not one the loop's
        ``to_thread`` calls need meanwhile.) It is sent once ``after`` (a deploy call still under way) has ended,
        so that the deploy cannot land after it. The next deploy of the model and ``stop`` wait for it."""
        self.handles.pop(name, None)

        async def delete() -> None:
            if after is not None:
                await asyncio.wait([after])  # its outcome is the deploy's, answered there
            await _on_own_thread(f"delete {model_app(name)}", _delete, model_app(name))

        pending = asyncio.ensure_future(delete())
        self.deleting[name] = pending
        pending.add_done_callback(lambda done: self._forget_delete(name, done))

    def _forget_delete(self, name: str, done: asyncio.Future[Any]) -> None:
        if self.deleting.get(name) is done:
            self.deleting.pop(name)

    async def _deleted(self, name: str) -> None:
        """Wait for the model's delete sent by ``_delete_soon``, if one is under way."""
        pending = self.deleting.get(name)
        if pending is not None:
            await asyncio.shield(pending)


def _exists(app: Any) -> bool:
    """Whether Ray has an application (its ``serve.status()`` entry, or None): one Ray is deleting (a deploy given
    up on) serves nothing, and a load replaces nothing there."""
    return app is not None and app.status != ApplicationStatus.DELETING


def _serving(app: Any) -> bool:
    """Whether an application is RUNNING: its replicas have started. UNHEALTHY is not adopted either: a replica
    failed its health checks, and Ray may have none that answers (``describe`` would wait); a load redeploys it,
    bounded by its start_timeout_s."""
    return app is not None and app.status == ApplicationStatus.RUNNING


async def _started(app_name: str, deploying: asyncio.Future[Any]) -> None:
    """Once the ``deploying`` call has ended, return when Ray runs the application (RUNNING); raise ``RuntimeError``
    if its deploy failed or it is gone. Serve has no event for this: its own ``serve.run`` reads the same status
    in a loop (every second)."""
    await asyncio.shield(deploying)  # a timeout leaves the call running: the delete after it waits for it
    while True:
        app = (await asyncio.to_thread(serve.status)).applications.get(app_name)
        if app is None or app.status == ApplicationStatus.DELETING:
            raise RuntimeError(f"application {app_name} was deleted while it deployed")
        if app.status == ApplicationStatus.RUNNING:
            return
        if app.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Deploying application {app_name} failed: {app.message}")
        await asyncio.sleep(START_POLL_S)


def _on_own_thread(thread_name: str, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
    """``call``'s outcome, from a daemon thread of its own: a call that may block without end holds no thread of
    the loop's default executor. A wait given up on leaves no unretrieved exception behind."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Any] = loop.create_future()
    outcome.add_done_callback(_consume)

    def report(settle: Callable[[Any], None], value: Any) -> None:
        if not outcome.done():
            settle(value)

    def run() -> None:
        try:
            settle, value = outcome.set_result, call(*args, **kwargs)
        except Exception as e:  # handed to the awaiting task, which decides
            settle, value = outcome.set_exception, e
        try:
            loop.call_soon_threadsafe(report, settle, value)
        except RuntimeError:  # the loop has closed: nobody waits for this outcome any more
            log.debug("%s ended after its event loop closed", thread_name)

    threading.Thread(target=run, name=thread_name, daemon=True).start()
    return outcome


def _delete(app_name: str) -> None:
    try:
        serve.delete(app_name)
    except Exception as e:  # the top of its own thread: nobody else would hear of it
        log.warning("deleting Ray Serve application %s: %s", app_name, e)


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
