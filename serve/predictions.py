"""TorchServe-style predictions: ``POST|PUT /predictions/{model}[/{version}]`` with the raw image as the body
(``curl -T cat.jpg``) or a multipart upload, answered with the top-k ``[{label, probability}]``.

One image gives one list; a multipart upload of several files gives a list of lists, in upload order.
The routes are ``DirectRoute``s: ``top_k`` is read here and declared in ``openapi_extra``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from deepserve.serve.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from deepserve.serve.http_util import (
    DirectRoute, Reply, body_limit, deadline_from, dump_json, headers_of, media_type, read_body,
)
from deepserve.serve.schemas import TIMEOUT_HEADER_PARAMETER, PredictionsResponse, answers
from deepserve.serve.servable import task_phrase

router = APIRouter(tags=["predictions (TorchServe style)"], route_class=DirectRoute)

DEFAULT_TOP_K, MAX_TOP_K = 5, 1000
_RAW_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")
_DOC = {
    "parameters": [
        {"name": "top_k", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K},
         "description": "How many labels to return, most probable first."},
        TIMEOUT_HEADER_PARAMETER,
    ],
    "requestBody": {"required": True, "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "data": {"type": "string", "format": "binary"}}}},
    }},
    "description": "The raw image as the body (PNG, JPEG, WebP, BMP or GIF), or multipart file parts.",
}
_RESPONSES = answers(PredictionsResponse, 400, 404, 413, 415, 429, 503, 504,
                     description="The top-k labels of the image, or one list per uploaded file.")


def top_k_param(request: Request) -> int:
    raw = request.query_params.get("top_k")
    if raw is None:
        return DEFAULT_TOP_K
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_TOP_K:
        raise BadRequest(f"query parameter top_k must be an integer from 1 to {MAX_TOP_K}, got {raw!r}")
    return k


async def _images(request: Request) -> list[bytes]:
    kind = media_type(request)
    if kind.startswith("multipart/form-data"):
        limit = body_limit(request)
        declared = headers_of(request).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        try:
            form = await request.form(max_part_size=limit)
        except Exception as e:  # python-multipart's parse errors: the client's malformed upload
            if isinstance(e, (BadRequest, PayloadTooLarge)):
                raise
            raise BadRequest(f"malformed multipart body: {e}") from None
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise BadRequest("multipart upload holds no file part; send the image as a file (-F data=@cat.jpg)")
        images = [await f.read() for f in files]
        await form.close()
        return images
    if kind.startswith("image/") or kind in _RAW_TYPES:
        return [await read_body(request)]
    raise UnsupportedMediaType(f"predictions take an image body (image/*, application/octet-stream) or "
                               f"multipart/form-data, not {kind}")


async def _predict(request: Request, model: str, version: str | None) -> Reply:
    top_k = top_k_param(request)
    servable = request.app.state.repository.get(model, version)
    if not hasattr(servable, "classify"):
        raise BadRequest(f"model {model!r} is {task_phrase(servable.manifest.task)}, not an image classifier")
    deadline = deadline_from(request)
    servable.check_admission(deadline)  # shed before reading and decoding the body
    images = await _images(request)
    start = time.perf_counter()
    result: Any = await servable.classify(images, top_k, deadline)
    took_ms = (time.perf_counter() - start) * 1000.0
    if len(result) == 1:
        result = result[0]
    # Server-Timing: decode, queue, batch and model time, for clients that show it (the playground)
    return Reply(dump_json(result), headers={"server-timing": f"classify;dur={took_ms:.3f}"})


@router.post("/predictions/{model}", name="predictions", openapi_extra=_DOC, responses=_RESPONSES)
@router.put("/predictions/{model}", name="predictions", openapi_extra=_DOC, responses=_RESPONSES)
async def predictions(request: Request, model: str) -> Reply:
    return await _predict(request, model, None)


@router.post("/predictions/{model}/{version}", name="predictions", openapi_extra=_DOC, responses=_RESPONSES)
@router.put("/predictions/{model}/{version}", name="predictions", openapi_extra=_DOC, responses=_RESPONSES)
async def predictions_version(request: Request, model: str, version: str) -> Reply:
    return await _predict(request, model, version)
