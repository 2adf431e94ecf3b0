"""TorchServe-style predictions: ``POST|PUT /predictions/{model}[/{version}]`` with the raw image as the body
(``curl -T cat.jpg``) or a multipart upload, answered with the top-k ``[{label, probability}]``.

One image gives one list; a multipart upload of several files gives a list of lists, in upload order.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile

from deepserve.serve.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from deepserve.serve.http_util import body_limit, deadline_from, media_type, read_body

router = APIRouter(tags=["predictions (TorchServe style)"])

_RAW_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")
_DOC = {
    "requestBody": {"content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "data": {"type": "string", "format": "binary"}}}},
    }},
    "description": "The raw image as the body (PNG, JPEG, WebP, BMP or GIF), or multipart file parts.",
}


async def _images(request: Request) -> list[bytes]:
    kind = media_type(request)
    if kind.startswith("multipart/form-data"):
        limit = body_limit(request)
        declared = request.headers.get("content-length")
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


async def _predict(request: Request, model: str, version: str | None, top_k: int) -> Any:
    servable = request.app.state.repository.get(model, version)
    if not hasattr(servable, "classify"):
        raise BadRequest(f"model {model!r} ({servable.manifest.task}) is not an image classifier")
    images = await _images(request)
    result = await servable.classify(images, top_k, deadline_from(request))
    return result[0] if len(result) == 1 else result


_TOP_K = Query(5, ge=1, le=1000, description="How many labels to return, most probable first.")


@router.post("/predictions/{model}", name="predictions", openapi_extra=_DOC)
@router.put("/predictions/{model}", name="predictions", include_in_schema=False)
async def predictions(request: Request, model: str, top_k: int = _TOP_K) -> Any:
    return await _predict(request, model, None, top_k)


@router.post("/predictions/{model}/{version}", name="predictions", openapi_extra=_DOC)
@router.put("/predictions/{model}/{version}", name="predictions", include_in_schema=False)
async def predictions_version(request: Request, model: str, version: str, top_k: int = _TOP_K) -> Any:
    return await _predict(request, model, version, top_k)
