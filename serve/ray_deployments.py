"""The Ray Serve deployments: one ``ModelReplica`` deployment per model, and the ``Ingress``.

A replica serves one model of the repository with deepserve's own app and servables: its dynamic batchers or
continuous-batching engine, unchanged. The ingress runs deepserve's app too, over a repository whose servables
are ``RemoteServable``s (manifests verified here, metadata from the replicas), so the index, health, metadata,
config, ``/v1/models``, ``/docs`` and ``/metrics`` are the plain server's own routes; per-model inference
requests (v2 infer, predictions, generate, generate_stream, completions) go to the model's replicas through
deployment handles (``RayForwarder``). Placement, replication, restarts and routing are Ray's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from deepserve.manifest import Manifest
from deepserve.serve.app import DeepServeApp, create_app
from deepserve.serve import control
from deepserve.serve.errors import BadRequest, NotReady, ServeError
from deepserve.serve.generation.openai_api import openai_error
from deepserve.serve.generation.routes import sse
from deepserve.serve.http_util import error_response, parse_json, read_body
from deepserve.serve.model_dir import single_model_view
from deepserve.serve.ray_bridge import portable_scope, receive_body_then, run_stream, run_unary
from deepserve.serve.repository import ModelRepository
from deepserve.serve.servable import Servable
from deepserve.signing import ArtifactTrust

log = logging.getLogger("deepserve.serve")

REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
"""A replica died or went away under a request: another replica may answer it."""
ATTEMPTS = 3
"""Tries per unary request (a request is safe to repeat: nothing in it changes server state)."""


@dataclass(frozen=True)
class ServingOptions:
    """What ``deepserve serve`` flags give every replica (picklable: Ray ships it to each)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelSettings fields from flags (None = not given); DEEPSERVE_* variables apply in each replica too."""
    device: str = "auto"
    max_body_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    trust: ArtifactTrust = field(default_factory=ArtifactTrust)
    """Trusted keys and whether folders may be symlinks out of the repository (``--trusted-keys`` ...)."""


@serve.deployment
class ModelReplica:
    """One replica of one model: its versions loaded, verified and warmed up by ``ModelRepository``."""

    async def __init__(self, repository: str, model: str, options: ServingOptions) -> None:
        self.model = model
        view = single_model_view(Path(repository) / model, model,
                                 allow_symlinks_out=options.trust.allow_symlinks_out)
        self.repository = ModelRepository(view, overrides=options.overrides, device=options.device,
                                          max_pixels=options.max_pixels,
                                          trust=replace(options.trust, allow_symlinks_out=True))  # the view's link
        self.app = create_app(self.repository, max_body_bytes=options.max_body_bytes)
        await self.repository.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def describe(self) -> dict[int, dict[str, Any]]:
        """Version -> ready, reason and (when ready) the servable's v2 metadata."""
        out = {}
        for status in self.repository.index()["models"][0]["version_status"]:
            version = int(status["version"])
            ready = status["ready"]
            meta = self.repository.get(self.model, version).metadata() if ready else None
            out[version] = {"ready": ready, "reason": status["reason"], "metadata": meta}
        return out

    async def request(self, scope: dict[str, Any], body: bytes) -> tuple[Message, bytes]:
        return await run_unary(self.app, scope, body, self.replica)

    async def stream(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        async for message in run_stream(self.app, scope, body, self.replica):
            yield message

    async def metrics(self) -> tuple[str, str]:
        """This replica's id and its Prometheus text (batchers, generation engine, process)."""
        return self.replica, self.repository.metrics.render()[0].decode()

    async def check_health(self) -> None:
        if not self.repository.ready:
            raise RuntimeError(f"model {self.model}: repository not started or stopping")

    async def __del__(self) -> None:
        await self.repository.stop()  # drain: queued and in-flight work finishes first


class RemoteServable(Servable):
    """A model version served by a deployment's replicas; ready when they report it ready."""

    def __init__(self, manifest: Manifest, directory: Path, settings: Any, handle: DeploymentHandle | None,
                 why_not: str | None) -> None:
        self.manifest, self.directory, self.settings = manifest, Path(directory), settings
        self.handle, self.why_not = handle, why_not
        self.ready, self.reason = False, "not started"
        self._metadata: dict[str, Any] = {}

    async def start(self) -> None:
        if self.handle is None:
            raise RuntimeError(self.why_not or "no Ray deployment for this model")
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


class RayForwarder:
    """ASGI front of the ingress: per-model inference requests go to that model's replicas; everything else,
    and every request the replicas could not take (unknown or unready model, bad body), to deepserve's app,
    which answers it exactly as ``deepserve serve`` does."""

    def __init__(self, app: DeepServeApp, handles: dict[str, DeploymentHandle]) -> None:
        self.app = app
        self.handles = handles
        self.streams = {name: h.options(stream=True) for name, h in handles.items()}
        self.repository: ModelRepository = app.state.repository
        self.replica_lost = Counter("deepserve_ray_replica_lost", "Requests whose replica died under them, by what "
                                    "followed: retried on another replica, stream_ended, or answered 503",
                                    ["model", "outcome"], registry=self.repository.metrics.registry)
        # the per-request inference routes: the app's front door's (v2 infer, predictions, Triton generate) and
        # OpenAI completions, whose model is in the body
        self.routes = [*(app.hot_path.routes if app.hot_path else ()),
                       *(r for r in _leaf_routes(app.router.routes) if r.name == "completions")]
        self.refused = [r for r in control.router.routes if "model" in r.param_convertors]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        if any(r.matches(scope)[0] is Match.FULL for r in self.refused):
            error = BadRequest("loading and unloading models is Ray's under --engine ray: change the model's "
                               "config.json (its ray section) and redeploy the application")
            return await error_response(error)(scope, receive, send)
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                break
        else:
            return await self.app(scope, receive, send)
        scope["app"] = self.app  # read_body's limit is the app's (--max-body-mb)
        start = time.perf_counter()
        try:
            body = await read_body(Request(scope, receive))
        except ServeError as e:
            return await error_response(e)(scope, receive, send)
        params = child["path_params"]
        model, version = params.get("model"), params.get("version")
        stream = route.name.startswith("generate_stream")
        if route.name == "completions":
            model, version, stream = self._completion_target(body)
        if model not in self.handles or not self.repository.is_ready(model, version):
            # the server's own answer: 404 / 503 / 400 with the plain server's words
            return await self.app(scope, receive_body_then(receive, body), send)
        status = await self._forward(model, portable_scope(scope, len(body)), body, stream, send)
        self.repository.metrics.observe_request(params.get("model", ""), route.name, status,
                                                time.perf_counter() - start)

    @staticmethod
    def _completion_target(body: bytes) -> tuple[str | None, str | None, bool]:
        try:
            payload = parse_json(body)
        except ServeError:
            return None, None, False
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
            return None, None, False
        name, _, version = payload["model"].partition(":")
        return name, version or None, payload.get("stream") is True

    async def _forward(self, model: str, scope: dict[str, Any], body: bytes, stream: bool, send: Send) -> int:
        """Send the request to a replica; on replica loss, try another before the answer started, else end the
        answer. Returns the status sent."""
        lost: BaseException | None = None
        for _ in range(ATTEMPTS):
            started = False
            try:
                if not stream:
                    start, payload = await self.handles[model].request.remote(scope, body)
                    await send(start)
                    await send({"type": "http.response.body", "body": payload, "more_body": False})
                    return start["status"]
                status = 200
                messages = self.streams[model].stream.remote(scope, body)
                try:
                    async for message in messages:
                        if message["type"] == "http.response.start":
                            started, status = True, message["status"]
                        await send(message)
                finally:
                    messages.cancel()  # a client gone (this task cancelled): the replica's generation stops too
                return status
            except REPLICA_LOST as e:
                log.warning("model %s: a replica was lost under a request (%s)", model, type(e).__name__)
                if started:  # the stream's head is out: end it with the error, in the stream's own shape
                    self.replica_lost.labels(model, "stream_ended").inc()
                    await send({"type": "http.response.body", "body": _stream_error(scope, e), "more_body": False})
                    return status
                self.replica_lost.labels(model, "retried").inc()
                lost = e
        self.replica_lost.labels(model, "answered_503").inc()
        error = NotReady(f"model {model!r}: its replicas were lost during the request ({type(lost).__name__}); "
                         f"Ray is restarting them, retry", headers={"Retry-After": "1"})
        await error_response(error)(scope, _never, send)
        return error.status


def _leaf_routes(routes: list[Any]) -> list[Any]:
    """The app's routes with a path, including those of included routers (this FastAPI keeps an included router
    as one entry, its routes under ``original_router``)."""
    out = []
    for route in routes:
        if hasattr(route, "path_regex"):
            out.append(route)
        else:
            inner = getattr(route, "original_router", route)
            out.extend(_leaf_routes(list(getattr(inner, "routes", ()))))
    return out


async def _never() -> Message:
    return {"type": "http.disconnect"}


def _stream_error(scope: dict[str, Any], error: BaseException) -> bytes:
    lost = NotReady(f"the model's replica was lost during the stream ({type(error).__name__})")
    if scope["path"].startswith("/v1/"):
        return sse(openai_error(lost))
    return sse({"error": lost.message, "status": lost.status})


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry: deepserve's app over remote servables, in front of the model deployments."""

    async def __init__(self, repository: str, handles: dict[str, DeploymentHandle], options: ServingOptions,
                       why_not: dict[str, str]) -> None:
        self.handles, self.options, self.why_not = handles, options, why_not
        # The ingress runs no model: it verifies manifests and asks the replicas, so it needs no GPU.
        self.repository = ModelRepository(repository, overrides=options.overrides, device="cpu",
                                          servable_factory=self._remote, max_pixels=options.max_pixels,
                                          trust=options.trust)

    def _remote(self, manifest: Manifest, directory: Path, settings: Any, device: str) -> Servable:
        name = Path(directory).parent.name  # <repository>/<model>/<version>: the deployment's name
        return RemoteServable(manifest, directory, settings, self.handles.get(name), self.why_not.get(name))

    def __serve_build_asgi_app__(self) -> RayForwarder:
        return RayForwarder(create_app(self.repository, max_body_bytes=self.options.max_body_bytes), self.handles)
