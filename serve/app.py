"""The FastAPI application: v2 routes, TorchServe-style predictions, generation routes (when that package is
present), ``/metrics``, ``/docs`` and the playground page at ``/``. Errors of every kind answer ``{"error": "..."}``.

The lifespan loads and warms up every model (``/v2/health/ready`` is 503 until then) and, on shutdown,
drains the batchers: uvicorn first stops accepting and waits for the requests in flight, whose queued work
the batchers finish.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import deepserve
from deepserve.serve.auth import AccessPolicy, AuthGate
from deepserve.serve.errors import ServeError
from deepserve.serve.heap import settle
from deepserve.serve.http_util import (
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH, DirectRoute, HotPath, error_response,
)
from deepserve.serve.metrics import Metrics, RequestMetricsMiddleware
from deepserve.serve.model_state import request_leases
from deepserve.serve.preprocess import DEFAULT_MAX_PIXELS
from deepserve.serve.repository import ModelRepository
from deepserve.serve.request_context import current_request_id, request_id_from

log = logging.getLogger("deepserve.serve")

OPTIONAL_ROUTERS = ("deepserve.serve.generation.routes", "deepserve.serve.generation.openai_api")


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("query", "path", "header", "body", "cookie"):
        return f"{parts[0]} parameter {'.'.join(parts[1:])}"
    return ".".join(parts) or "request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> Response:
        if exc.reject_reason is not None:
            request.app.state.repository.metrics.reject(exc.reject_reason)
        return error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after answering; the front door (DeepServeApp) logs it
        return JSONResponse({"error": f"internal server error; the server log has the details under request id "
                                      f"{current_request_id.get()}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            value = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
            problems.append(f"{_field(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}{value}")
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path may have several routes
            allowed = allowed_methods(request.app, request.scope)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            return JSONResponse({"error": f"method {request.method} is not allowed here; use {' or '.join(allowed)}"},
                                status_code=405, headers=headers)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of ``app`` (included routers too) answers at the request's path."""
    return [m for m in _METHODS
            if any(route.matches({**scope, "method": m})[0] is Match.FULL for route in app.router.routes)]


class DeepServeApp(FastAPI):
    """FastAPI with a front door: every HTTP request gets its request id (``request_context``), echoed as
    ``X-Request-Id``; while draining (SIGTERM) new requests are answered 503 with ``Connection: close``; then
    ``gate`` (CORS, API keys), when set, and ``hot_path``, which answers the per-request inference routes (v2
    infer, predictions, Triton generate) before the middleware stack is entered; everything else (metadata,
    OpenAI completions, docs, metrics) takes the normal path. Each request holds the servables it looks up until
    it is answered (``model_state.request_leases``). An unexpected error is logged under the request id and
    answered with a JSON 500 naming that id."""

    hot_path: HotPath | None = None
    gate: ASGIApp | None = None
    draining: bool = False
    """Set on SIGTERM: requests in flight finish, new ones are refused (``serve/shutdown.py``)."""
    aborted: int = 0
    """Requests cancelled before they were answered (a drain that ran past its timeout)."""
    echo_request_id: bool = True
    """Add ``X-Request-Id`` to answers; off where a proxy in front adds the same id itself (Ray Serve's)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request_id, problem = request_id_from(scope["headers"])
        token = current_request_id.set(request_id)
        id_header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.echo_request_id:
                    message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            if problem is not None or self.draining:
                await _refusal(problem)(scope, receive, send_with_id)
                return
            await (self.gate or self.dispatch)(scope, receive, send_with_id)
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        except Exception:  # a bug, not the client's fault: details to the log, a JSON 500 to the client
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                await JSONResponse({"error": f"internal server error; the server log has the details under "
                                             f"request id {request_id}"}, status_code=500)(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        with request_leases():
            if self.hot_path is not None:
                scope["app"] = self  # what Starlette sets, so handlers reach app.state through the request
                if await self.hot_path(scope, receive, send):
                    return
            await super().__call__(scope, receive, send)


def _refusal(problem: str | None) -> JSONResponse:
    """The answer to a request refused at the front door: a bad X-Request-Id, or the server is draining."""
    if problem is not None:
        return JSONResponse({"error": problem}, status_code=400)
    return JSONResponse({"error": "server is shutting down; retry on a new connection"}, status_code=503,
                        headers={"Connection": "close", "Retry-After": "1"})


def create_app(
    repository: ModelRepository | Path | str,
    *,
    settings: Mapping[str, Any] | None = None,
    device: str = "auto",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    access: AccessPolicy | None = None,
    cors_allow_origins: list[str] | None = None,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> DeepServeApp:
    """The app serving ``repository`` (a path, scanned now, or a ready-made ``ModelRepository``).

    ``settings`` overrides ``ModelSettings`` fields for every model (CLI flags); ``device`` is auto|cpu|cuda;
    ``access`` holds the API keys (None: every route open, model control on loopback only);
    ``cors_allow_origins`` turns CORS on for those origins (``*`` for any).
    """
    if not isinstance(repository, ModelRepository):
        repository = ModelRepository(repository, overrides=settings, device=device, max_pixels=max_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.repository.start()
        settle()  # the start-up heap leaves the collector's generations: no full collection walks it again
        app.state.repository.metrics.set_serving(True)
        try:
            yield
        finally:
            app.state.repository.metrics.set_serving(False)
            await app.state.repository.stop()

    app = DeepServeApp(
        title="deepserve",
        version=deepserve.__version__,
        description="Image classifiers over KServe v2 (Triton-compatible) and TorchServe-style predictions; "
                    "char-LM and seq2seq generation.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by pages.install_docs: the defaults load a CDN
        redoc_url=None,
    )
    app.state.repository = repository
    app.state.max_body_bytes = max_body_bytes
    app.state.max_json_depth = max_json_depth
    install_error_handlers(app)

    hot_routes = install_routes(app, repository.metrics)
    app.hot_path = HotPath(hot_routes, repository.metrics.observe_request, repository.metrics.reject)
    app.add_middleware(RequestMetricsMiddleware, metrics=repository.metrics)  # every other route
    app.gate = front_gate(app, access or AccessPolicy.open(), cors_allow_origins, repository.metrics)
    return app


def install_routes(app: FastAPI, metrics: Metrics) -> list[DirectRoute]:
    """Add every route to ``app``; the per-request POST routes that go through the front door are returned
    (v2 infer, predictions, an optional package's HOT_ROUTES such as Triton generate)."""
    from deepserve.serve import control, pages, predictions, v2

    # The classification routes go on the app's own router, not through include_router: this FastAPI matches
    # a request to an included router's routes twice (match, then dispatch), a cost every request pays.
    # Route objects hold no per-app state (handlers reach the repository through request.app).
    app.router.routes.extend([*v2.router.routes, *predictions.router.routes, *control.router.routes])
    optional_hot: list = []
    for name in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("deepserve.serve.generation"):  # not built yet
                log.info("optional routes %s are not available (%s)", name, e)
                continue
            raise
        app.include_router(module.router)
        optional_hot.extend(getattr(module, "HOT_ROUTES", ()))

    @app.get("/metrics", name="metrics", tags=["observability"], response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format: this repository's serving metrics and "
                                             "prometheus-client's default registry (generation, process)."}})
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    pages.install_docs(app)
    pages.install_playground(app)
    return [r for r in (*v2.router.routes, *predictions.router.routes, *optional_hot)
            if isinstance(r, DirectRoute) and "POST" in (r.methods or ())]


def front_gate(app: DeepServeApp, access: AccessPolicy, cors_allow_origins: list[str] | None,
               metrics: Metrics, inner: ASGIApp | None = None) -> ASGIApp:
    """The key check in front of ``app.dispatch`` (or ``inner``: the Ray ingress's forwarder), with CORS outside
    it when origins are allowed."""
    gate: ASGIApp = AuthGate(inner or app.dispatch, access, metrics.reject)
    if cors_allow_origins:  # outside the key check: browsers send preflights without credentials
        gate = CORSMiddleware(gate, allow_origins=cors_allow_origins, allow_methods=["*"], allow_headers=["*"],
                              expose_headers=["Retry-After", "WWW-Authenticate", "Inference-Header-Content-Length",
                                              "X-Request-Id"])
    return gate
