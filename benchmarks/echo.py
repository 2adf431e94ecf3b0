"""The HTTP ceiling: a trivial FastAPI app on the same stack as the deepserve server.

It reads the request body (so the same bytes cross the same uvicorn + Starlette path) and answers with a fixed
body shaped like a small classification response, without decoding the payload or running a model. The
classification server's requests/s are reported as a fraction of this app's, measured with the same load
generator, payloads and concurrency.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import Response

# What a v2 classification answer for one 10-class row looks like, in size and shape.
_ANSWER = json.dumps({
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
        return Response(_ANSWER if body else b"{}", media_type="application/json")

    @app.post("/predictions/{model}")
    async def predictions(request: Request, model: str) -> Response:
        body = await request.body()
        return Response(_ANSWER if body else b"{}", media_type="application/json")

    return app
