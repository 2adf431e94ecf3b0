"""The ingress of the Ray Serve application: deepserve's app over a ``RayModelRepository``, in front of the
models' deployments (``ray_replica.py``, ``ray_control.py``).

The app's front door is the plain server's: request ids, CORS and API keys (``--api-key``, ``--admin-api-key``,
``--metrics-auth``) are checked here first. Then the index, health, metadata, config, ``/v1/models``, ``/docs``
and model control are the plain server's own routes; per-model inference requests (v2 infer, predictions,
generate, generate_stream, completions) go to the model's replicas through deployment handles
(``RayForwarder``), and ``/metrics`` adds every replica's series (``ray_metrics.py``). Placement, replication,
restarts and routing are Ray's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response
from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepserve.serve.app import DeepServeApp, create_app, front_gate
from deepserve.serve.auth import AccessPolicy
from deepserve.serve.errors import NotReady, ServeError
from deepserve.serve.generation.openai_api import openai_error
from deepserve.serve.generation.routes import sse
from deepserve.serve.http_util import DEFAULT_MAX_JSON_DEPTH, error_response, parse_json, read_body
from deepserve.serve.ray_bridge import portable_scope, receive_body_then
from deepserve.serve.ray_control import RayModelRepository
from deepserve.serve.ray_metrics import ingress_families, scrape
from deepserve.serve.ray_replica import ServingOptions
from deepserve.serve.request_context import current_request_id

log = logging.getLogger("deepserve.serve")

REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
"""A replica died or went away under a request: another replica may answer it."""
ATTEMPTS = 3
"""Tries per unary request (a request is safe to repeat: nothing in it changes server state)."""


@dataclass(frozen=True)
class FrontOptions:
    """What only the ingress needs: who may call (keys, CORS) and which models load (``--model-control``)."""

    access: AccessPolicy | None = None
    """API and admin keys, ``--metrics-auth``; None: every route open, model control on loopback only."""
    cors_allow_origins: list[str] = field(default_factory=list)
    model_control: str = "none"
    load_models: tuple[str, ...] = ()
    poll_interval_s: float = 5.0
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH


class RayForwarder:
    """The ingress app's dispatch, behind its front door and gate: per-model inference requests go to that
    model's replicas, ``/metrics`` gathers theirs; everything else, and every request the replicas could not
    take (unknown or unready model, bad body), goes to deepserve's app (``dispatch``), which answers it exactly
    as ``deepserve serve`` does."""

    def __init__(self, app: DeepServeApp, dispatch: ASGIApp) -> None:
        self.app, self.dispatch = app, dispatch
        self.repository: RayModelRepository = app.state.repository
        self._streams: dict[str, tuple[DeploymentHandle, DeploymentHandle]] = {}
        """Model -> (its handle, that handle's streaming view): a redeploy gives a new handle."""
        self.replica_lost = Counter("deepserve_ray_replica_lost", "Requests whose replica died under them, by what "
                                    "followed: retried on another replica, stream_ended, or answered 503",
                                    ["model", "outcome"], registry=self.repository.metrics.registry)
        self.owned = ingress_families(self.repository.metrics)
        """The families the ingress answers itself; its registry gains none after this counter."""
        # the per-request inference routes: the app's front door's (v2 infer, predictions, Triton generate) and
        # OpenAI completions, whose model is in the body
        self.routes = [*(app.hot_path.routes if app.hot_path else ()),
                       *(r for r in _leaf_routes(app.router.routes) if r.name == "completions")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/metrics":
            body, content_type = await scrape(self.repository.metrics, dict(self.repository.handles),
                                              self.owned)
            return await Response(body, media_type=content_type)(scope, receive, send)
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.dispatch(scope, receive, send)
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                break
        else:
            return await self.dispatch(scope, receive, send)
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
        if model not in self.repository.handles or not self.repository.is_ready(model, version):
            # the server's own answer: 404 / 503 / 400 with the plain server's words
            return await self.dispatch(scope, receive_body_then(receive, body), send)
        forwarded = portable_scope(scope, len(body), request_id=current_request_id.get())
        status = await self._forward(model, forwarded, body, stream, send)
        self.repository.metrics.observe_request(params.get("model", ""), route.name, status,
                                                time.perf_counter() - start)

    def _handle(self, model: str, stream: bool) -> DeploymentHandle:
        handle = self.repository.handles[model]
        if not stream:
            return handle
        cached = self._streams.get(model)
        if cached is None or cached[0] is not handle:
            cached = self._streams[model] = (handle, handle.options(stream=True))
        return cached[1]

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
                    start, payload = await self._handle(model, False).request.remote(scope, body)
                    await send(start)
                    await send({"type": "http.response.body", "body": payload, "more_body": False})
                    return start["status"]
                status = 200
                messages = self._handle(model, True).stream.remote(scope, body)
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
    """The HTTP entry: deepserve's app over a ``RayModelRepository``, in front of the model deployments."""

    async def __init__(self, repository: str, options: ServingOptions, front: FrontOptions) -> None:
        self.options, self.front = options, front
        self.repository = RayModelRepository(repository, options, model_control=front.model_control,
                                             load_models=front.load_models, poll_interval_s=front.poll_interval_s)

    def __serve_build_asgi_app__(self) -> DeepServeApp:
        app = create_app(self.repository, max_body_bytes=self.options.max_body_bytes,
                         max_json_depth=self.front.max_json_depth)
        app.echo_request_id = False  # Ray's proxy answers with the request's id (the one this app was given)
        forwarder = RayForwarder(app, app.dispatch)
        app.gate = front_gate(app, self.front.access or AccessPolicy.open(), self.front.cors_allow_origins or None,
                              self.repository.metrics, inner=forwarder)
        return app
