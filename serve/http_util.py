"""HTTP helpers shared by the v2 and predictions routes: bounded body reading, content decoding, deadlines,
and ``DirectRoute``, the route class of the request hot path."""

from __future__ import annotations

import inspect
import time
import zlib
from typing import Any, Callable, Coroutine

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from deepserve.serve.errors import BadRequest, PayloadTooLarge, ServeError, UnsupportedMediaType

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
TIMEOUT_HEADER = "x-request-timeout-ms"
"""Relative deadline of a request in milliseconds (v2 requests may use Triton's ``parameters.timeout``)."""


def body_limit(request: Request) -> int:
    return getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes (--max-body-mb)")


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past the configured limit (checked before reading when the length
    is declared, while streaming otherwise) and decompressed for ``Content-Encoding: gzip|deflate``."""
    limit = body_limit(request)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"Content-Length must be a number, got {declared!r}")
        if int(declared) > limit:
            raise _too_large(declared, limit)
        body = await request.body()
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"over {limit}", limit)
            chunks.append(chunk)
        body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"body is not valid {encoding} data: {e}") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise _too_large(f"over {limit} (decompressed)", limit)
    return out


def deadline_from(request: Request, timeout_us: object = None) -> float | None:
    """An absolute ``time.monotonic()`` deadline from the timeout header or Triton's ``timeout`` (µs)."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            ms = float(header)
        except ValueError:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be a number of milliseconds, got {header!r}") from None
        if ms <= 0:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be > 0, got {header!r}")
        return time.monotonic() + ms / 1000.0
    if timeout_us is not None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float)) or timeout_us < 0:
            raise BadRequest(f"parameters.timeout must be a non-negative number of microseconds, got {timeout_us!r}")
        if timeout_us > 0:  # Triton: 0 means no timeout
            return time.monotonic() + timeout_us / 1e6
    return None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class DirectRoute(APIRoute):
    """An ``APIRoute`` whose handler calls ``endpoint(request, **path parameters)`` and sends the ``Response``
    it returns: no per-request dependency solving, parameter validation or response serialisation, which
    cost FastAPI more than decoding, batching and answering a small model's request.

    The endpoint's signature still documents its path parameters in OpenAPI, so it may take only ``request``
    and ``str`` path parameters (checked here, at import); anything else — query parameters, headers, the
    body — it reads itself and declares in ``openapi_extra``.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        params = list(inspect.signature(endpoint).parameters.values())
        if not params or params[0].name != "request":
            raise TypeError(f"{endpoint.__name__}: a DirectRoute endpoint takes request first")
        for p in params[1:]:
            if "{" + p.name + "}" not in path or p.annotation not in (str, "str"):
                raise TypeError(f"{endpoint.__name__}: parameter {p.name!r} is not a str path parameter of {path}")
        super().__init__(path, endpoint, **kwargs)
        handler = self.get_route_handler()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            # No per-request exit stacks (no dependencies) and no route-level exception wrapper: errors reach
            # the app's ExceptionMiddleware, whose handlers answer them the same way.
            response = await handler(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request, **request.path_params)

        return handler


class HotPathMiddleware:
    """Front door for the per-request hot routes (v2 infer, predictions): a ``DirectRoute`` that matches is
    answered here, before Starlette's exception middleware, FastAPI's per-request exit stack and the router's
    linear scan of every route — together about a fifth of the server's CPU for a small model. Other requests
    go down the normal stack. ``ServeError``s get the same ``{"error": ...}`` answer as the app's handler."""

    def __init__(self, app: ASGIApp, routes: list[DirectRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    try:
                        await route.app(scope, receive, send)
                    except ServeError as exc:
                        await error_response(exc)(scope, receive, send)
                    except StarletteHTTPException as exc:
                        await JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                                           headers=exc.headers)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def error_response(exc: ServeError) -> JSONResponse:
    """The v2 error shape ``{"error": message}`` with the exception's status and headers."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
