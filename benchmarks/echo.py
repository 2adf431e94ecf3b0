"""The HTTP ceiling: a trivial FastAPI app on the same stack as the deepserve server, and the floor under it.

It reads the request body (so the same bytes cross the same uvicorn + Starlette path) and answers with a fixed
body shaped like a small classification response, without decoding the payload or running a model. The
classification server's requests/s are reported as a fraction of this app's, measured with the same load
generator, payloads and concurrency.

``bare_app`` does the same with no framework at all: a plain ASGI callable that uvicorn (httptools, uvloop)
runs directly, ``python -m uvicorn benchmarks.echo:bare_app``. What it serves is the most any app on that server
can serve on the same cores.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

# What a v2 classification answer for one 10-class row looks like, in size and shape.
ANSWER = json.dumps({
    "model_name": "echo", "model_version": "1", "id": "",
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [0.125] * 10}],
}, separators=(",", ":")).encode()


def create_echo_app() -> FastAPI:
    app = FastAPI(title="deepserve benchmark echo", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    @app.post("/v2/models/{model}/infer")
    async def infer(request: Request, model: str) -> Response:
        body = await request.body()
        return Response(ANSWER if body else b"{}", media_type="application/json")

    @app.post("/predictions/{model}")
    async def predictions(request: Request, model: str) -> Response:
        body = await request.body()
        return Response(ANSWER if body else b"{}", media_type="application/json")

    return app


_BARE_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def bare_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Any HTTP request: its body read to the end, then the fixed answer with the body's length read in
    ``x-body-bytes`` (what shows that the body was read here, not only drained by uvicorn); no routing, no
    framework."""
    if scope["type"] != "http":
        return  # uvicorn runs it with --lifespan off; nothing else is spoken here
    read, more = 0, True
    while more:
        message = await receive()
        read += len(message.get("body", b""))
        more = message.get("more_body", False)
    headers = [*_BARE_HEADERS, (b"x-body-bytes", str(read).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})
