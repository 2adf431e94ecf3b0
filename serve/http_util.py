"""HTTP helpers shared by the v2 and predictions routes: bounded body reading, content decoding, deadlines,
``DirectRoute`` (the route class of the request hot path) and ``HotPath``, the front door that answers those
routes before the framework's middleware stack."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
import zlib
from typing import Any, Callable, Coroutine

import orjson
from fastapi.datastructures import Default, DefaultPlaceholder
from fastapi.routing import APIRoute
import numpy as np
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from deepserve.serve.errors import BadRequest, PayloadTooLarge, ServeError, UnsupportedMediaType

log = logging.getLogger("deepserve.serve")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a JSON body may have (``--max-json-depth``): a v2 tensor of rank 8
inside its request needs 11."""
MAX_JSON_DEPTH_LIMIT = 512
"""Upper bound of ``--max-json-depth``: the standard library's parser (NaN/Infinity bodies) recurses per level."""
TIMEOUT_HEADER = "x-request-timeout-ms"
"""Relative deadline of a request in milliseconds (v2 requests may use Triton's ``parameters.timeout``)."""
MAX_TIMEOUT_MS = 86_400_000.0
"""Longest deadline a request may ask for (one day): a deadline is a timer, and timers need finite delays."""
JSON_MEDIA_TYPES = ("", "application/json", "application/x-www-form-urlencoded")
"""Content types a JSON body may declare, besides ``application/*+json``: none, and curl's ``-d`` default."""


_HEADERS_KEY = "deepserve.headers"


def headers_of(request: Request) -> dict[str, str]:
    """The request's headers as a plain dict (lower-case names; the first of repeated headers), built once
    per request: Starlette's ``request.headers.get`` scans and re-encodes the raw list on every lookup."""
    scope = request.scope
    headers = scope.get(_HEADERS_KEY)
    if headers is None:
        headers = scope[_HEADERS_KEY] = {k.decode("latin-1"): v.decode("latin-1")
                                         for k, v in reversed(scope["headers"])}
    return headers


def body_limit(request: Request) -> int:
    return getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)


class Reply:
    """A raw route's answer (see ``DirectRoute``): one body, sent as two ASGI messages by ``send_reply``."""

    __slots__ = ("body", "content_type", "status", "headers")

    def __init__(self, body: bytes, content_type: bytes = b"application/json", status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.content_type = content_type
        self.status = status
        self.headers = headers
        """More headers, by lower-case name."""


async def send_answer(answer: Reply | Response, scope: Scope, receive: Receive, send: Send) -> int:
    """Send a route's answer and return its status: a ``Reply`` as two ASGI messages, with the headers a
    Starlette ``Response`` would have; a ``Response`` (a stream's) as it sends itself."""
    if not isinstance(answer, Reply):
        await answer(scope, receive, send)
        return answer.status_code
    headers = [(b"content-length", b"%d" % len(answer.body)), (b"content-type", answer.content_type)]
    if answer.headers:
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
    return answer.status


class BodyRequest(Request):
    """The request a hot route's endpoint gets. ``read_body`` reads the body off the ASGI channel itself and keeps
    it in ``raw_body``, where ``body()`` (and so ``json()``) finds it: a later reader gets the same bytes instead of
    waiting on the drained channel."""

    raw_body: bytes | None = None
    """The raw body once ``read_body`` has read it (still compressed, as sent)."""

    async def body(self) -> bytes:
        return self.raw_body if self.raw_body is not None else await super().body()


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes (--max-body-mb)")


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past the configured limit (checked before reading when the length
    is declared, while streaming otherwise) and decompressed for ``Content-Encoding: gzip|deflate``. It drains
    the channel: a ``BodyRequest`` keeps what was read for later readers."""
    limit = body_limit(request)
    headers = headers_of(request)
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"Content-Length must be a number, got {declared!r}")
        if int(declared) > limit:
            raise _too_large(declared, limit)
    chunks, size, more = [], 0, True
    while more:  # from the ASGI channel itself: Starlette's body() wraps it in an async generator per request
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit}", limit)
        chunks.append(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if isinstance(request, BodyRequest):
        request.raw_body = body
    encoding = headers.get("content-encoding")
    if encoding is None:
        return body
    encoding = encoding.strip().lower()
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


def json_depth_limit(request: Request) -> int:
    return getattr(request.app.state, "max_json_depth", DEFAULT_MAX_JSON_DEPTH)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not count). Scans in C
    (a regex and numpy), so it can run before parsing: the parsers recurse once per level."""
    if b'"' in text:
        text = _JSON_STRING.sub(b"", text)
    steps = _BRACKET_STEP[np.frombuffer(text, dtype=np.uint8)]
    steps = steps[steps != 0]
    return int(np.cumsum(steps, dtype=np.int64).max()) if steps.size else 0


def parse_json(body: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """A JSON request body; ``BadRequest`` naming the problem when it is not JSON or nests deeper than
    ``max_depth``. Every route that reads a JSON body parses it here."""
    if body.count(b"[") + body.count(b"{") > max_depth:  # cheap: only then can it be too deep
        depth = json_depth(body)
        if depth > max_depth:
            raise BadRequest(f"JSON body nests {depth} levels deep; the limit is {max_depth} (--max-json-depth)")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # the standard library also takes NaN/Infinity, and words its errors for people
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    except RecursionError:  # not reached within MAX_JSON_DEPTH_LIMIT; a 400 all the same
        raise BadRequest(f"JSON body nests too deep; the limit is {max_depth} (--max-json-depth)") from None


def require_json(request: Request, also: tuple[str, ...] = ()) -> None:
    """Refuse (415) a body whose declared content type is not JSON (nor one of ``also``)."""
    kind = media_type(request)
    if kind in JSON_MEDIA_TYPES or kind in also or (kind.startswith("application/") and kind.endswith("+json")):
        return
    raise UnsupportedMediaType(f"this route takes a JSON body (Content-Type: application/json), not {kind}")


def dump_json(value: Any) -> bytes:
    """Compact JSON; numpy arrays written as lists (NaN and infinities become null)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def deadline_from(request: Request, timeout_us: object = None) -> float | None:
    """An absolute ``time.monotonic()`` deadline from the timeout header or Triton's ``timeout`` (µs)."""
    header = headers_of(request).get(TIMEOUT_HEADER)
    if header is not None:
        try:
            ms = float(header)
        except ValueError:
            ms = math.nan
        # nan and inf are refused too: a deadline is a timer; a request wanting none omits the header
        if not 0 < ms <= MAX_TIMEOUT_MS:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be a number of milliseconds > 0 and "
                             f"<= {MAX_TIMEOUT_MS:.0f}, got {header!r}")
        return time.monotonic() + ms / 1000.0
    if timeout_us is not None:
        if (isinstance(timeout_us, bool) or not isinstance(timeout_us, int)
                or not 0 <= timeout_us <= MAX_TIMEOUT_MS * 1000):
            raise BadRequest(f"parameters.timeout must be an integer number of microseconds from 0 to "
                             f"{MAX_TIMEOUT_MS * 1000:.0f}, got {timeout_us!r}")
        if timeout_us > 0:  # Triton: 0 means no timeout
            return time.monotonic() + timeout_us / 1e6
    return None


def media_type(request: Request) -> str:
    return headers_of(request).get("content-type", "").split(";", 1)[0].strip().lower()


class DirectRoute(APIRoute):
    """An ``APIRoute`` whose handler calls ``endpoint(request, **path parameters)`` and sends the ``Reply`` (two
    ASGI messages, no ``Response`` object) or ``Response`` it returns (``send_answer``): no per-request dependency
    solving, parameter validation or response serialisation, which cost FastAPI more than decoding, batching and
    answering a small model's request. An endpoint annotated to return ``Reply`` gets no inferred response model.

    The endpoint's signature still documents its path parameters in OpenAPI, so it may take only ``request``
    and ``str`` path parameters (checked here, at import); anything else — query parameters, headers, the
    body — it reads itself and declares in ``openapi_extra``.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        signature = inspect.signature(endpoint)
        params = list(signature.parameters.values())
        if not params or params[0].name != "request":
            raise TypeError(f"{endpoint.__name__}: a DirectRoute endpoint takes request first")
        for p in params[1:]:
            if "{" + p.name + "}" not in path or p.annotation not in (str, "str"):
                raise TypeError(f"{endpoint.__name__}: parameter {p.name!r} is not a str path parameter of {path}")
        raw = signature.return_annotation in (Reply, "Reply")
        if raw and isinstance(kwargs.get("response_model", Default(None)), DefaultPlaceholder):
            kwargs["response_model"] = None  # documented by ``responses``, not inferred from Reply
        super().__init__(path, endpoint, **kwargs)
        handler = self.get_route_handler()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            # No per-request exit stacks (no dependencies) and no route-level exception wrapper: errors reach
            # the app's ExceptionMiddleware, whose handlers answer them the same way.
            await send_answer(await handler(BodyRequest(scope, receive, send)), scope, receive, send)

        self.app = app

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Reply | Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Reply | Response:
            return await endpoint(request, **request.path_params)

        return handler


CLIENT_GONE = 499
"""The status counted for a request whose client left before its answer (nginx's): nothing is sent."""


class HotPath:
    """Front door for the per-request hot routes (v2 infer, predictions, Triton generate): a ``DirectRoute``
    that matches is answered here, ahead of the whole middleware stack (Starlette's error and exception
    middleware, FastAPI's telemetry and body-limit wrappers, its per-request exit stack, the router's linear
    scan of every route, and the metrics middleware's send wrapper) — together more CPU than decoding,
    batching and answering a small model's request. It counts and times the request itself. ``ServeError``s
    and HTTP exceptions get the same ``{"error": ...}`` answer as the app's handlers; a client gone before its
    answer is counted as 499; anything else propagates (a 500, logged by the server) after being counted."""

    def __init__(self, routes: list[DirectRoute], observe: Callable[[str, str, int, float], None],
                 reject: Callable[[str], None] | None = None) -> None:
        self.routes = routes
        self.observe = observe
        """``observe(model, endpoint, status, seconds)``, the request metrics."""
        self.reject = reject
        """``reject(reason)``: counts a request refused by a limit."""
        # Path parameters are plain {name}s (DirectRoute checks it): the regex's groups are the parameters
        self._table = [(route.path_regex.match, frozenset(route.methods or ()), route) for route in routes]

    def match(self, scope: Scope) -> DirectRoute | None:
        """The hot route answering this request, with the scope's ``path_params``, ``route`` and ``endpoint``
        set as Starlette's router sets them; None when no hot route takes its path and method."""
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # routes match the path below the mount point, as Starlette's do
            path = path[len(root):]
        method = scope["method"]
        for match, methods, route in self._table:
            found = match(path)
            if found is not None and method in methods:
                scope["path_params"], scope["route"], scope["endpoint"] = found.groupdict(), route, route.endpoint
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer the request if a hot route matches it; ``False`` (nothing sent) otherwise."""
        route = self.match(scope)
        if route is None:
            return False
        params = scope["path_params"]
        start = time.perf_counter()
        status = 500
        try:
            try:
                answer = await route.endpoint(BodyRequest(scope, receive, send), **params)
            except ServeError as exc:
                if exc.reject_reason is not None and self.reject is not None:
                    self.reject(exc.reject_reason)
                answer = error_reply(exc)
            status = await send_answer(answer, scope, receive, send)
        except ClientDisconnect:
            status = CLIENT_GONE
        except StarletteHTTPException as exc:
            status = exc.status_code
            await JSONResponse({"error": str(exc.detail)}, status_code=status, headers=exc.headers)(
                scope, receive, send)
        finally:
            self.observe(params.get("model", ""), route.name, status, time.perf_counter() - start)
        return True


def error_body(exc: ServeError) -> bytes:
    """The v2 error shape ``{"error": message}`` (and ``code`` for the errors that have one). A server-side
    failure's details go to the log (under the request id), not into the answer."""
    if exc.status >= 500:
        log.warning("answered %d: %s", exc.status, getattr(exc, "detail", exc.message))
    return dump_json({"error": exc.message} if exc.code is None else {"error": exc.message, "code": exc.code})


def error_reply(exc: ServeError) -> Reply:
    """``error_body`` with the exception's status and headers, for a raw route."""
    return Reply(error_body(exc), status=exc.status, headers={k.lower(): v for k, v in exc.headers.items()})


def error_response(exc: ServeError) -> Response:
    """``error_body`` with the exception's status and headers, as a Starlette ``Response``."""
    return Response(error_body(exc), status_code=exc.status, media_type="application/json", headers=exc.headers)
