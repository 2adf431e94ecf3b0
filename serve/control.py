"""Triton's model repository extension: list, load (with a config override) and unload models at runtime.

    POST /v2/repository/index                   [{"name", "version", "state", "reason"}, ...]; body {"ready": true}
                                                lists only ready versions
    POST /v2/repository/models/{model}/load     body {"parameters": {"config": "<json>"}} optional
    POST /v2/repository/models/{model}/unload   drains (in-flight requests finish), then frees the model

``tritonclient.http``'s ``get_model_repository_index``, ``load_model`` and ``unload_model`` speak exactly this.
Load and unload answer the model's index rows once done; a failed load answers 400 naming every failure (what
served before keeps serving). The auth gate guards these routes with the admin key (``auth.py``). With several worker processes (``serve
--workers``) each holds its own models, so load and unload answer 409: ``--model-control poll`` keeps them all
on the repository instead.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deepserve.serve.errors import BadRequest, Conflict
from deepserve.serve.http_util import DirectRoute, parse_json, read_body
from deepserve.serve.schemas import RepositoryIndexRow, answers
from deepserve.serve.metrics import worker_count

router = APIRouter(tags=["model control (Triton model repository extension)"], route_class=DirectRoute)



def _json_body(properties: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for an optional JSON object body (these routes parse it by hand)."""
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties}}}}}


_LOAD_DOC = _json_body({"parameters": {"type": "object", "properties": {
    "config": {"type": "string", "contentMediaType": "application/json", "description": "JSON settings replacing the model's config.json for this load, "
                                                "e.g. {\"max_batch_size\": 8, \"version_policy\": \"latest 1\"}"}}}})
_UNLOAD_DOC = _json_body({"parameters": {"type": "object", "properties": {
    "unload_dependents": {"type": "boolean", "description": "Accepted for Triton's clients; no dependents here."}}}})
_INDEX_DOC = _json_body({"ready": {"type": "boolean", "description": "List only the ready versions."}})


async def _body(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"parameters must be an object, got {params!r}")
    return body


def config_override(params: dict[str, Any]) -> dict[str, Any] | None:
    """The ``parameters.config`` of a load call as a settings mapping, or None; ``BadRequest`` naming it."""
    files = sorted(k for k in params if k.startswith("file:"))
    if files:
        raise BadRequest(f"parameters {files}: loading model files sent in the request is not supported; copy the "
                         f"artifact into the repository and load it by name")
    config = params.get("config")
    if config is None:
        return None
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise BadRequest(f"parameters.config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise BadRequest(f"parameters.config must be a JSON object of settings, got {config!r}")
    return config


def _one_worker(action: str) -> None:
    """``Conflict`` (409) when several worker processes serve: this one cannot change the others' models."""
    workers = worker_count()
    if workers > 1:
        raise Conflict(f"cannot {action} models at run time: the server runs {workers} worker processes "
                       f"(--workers), each with its own models; change the repository and serve it with "
                       f"--model-control poll, or run with --workers 1")


def _rows(request: Request, model: str) -> Response:
    rows = [r for r in request.app.state.repository.triton_index() if r["name"] == model]
    return JSONResponse(rows)


@router.post("/v2/repository/index", name="repository_index", openapi_extra=_INDEX_DOC,
             responses=answers(list[RepositoryIndexRow], 400, 401, 403))
async def repository_index(request: Request) -> Response:
    ready = (await _body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f"ready must be true or false, got {ready!r}")
    return JSONResponse(request.app.state.repository.triton_index(ready_only=ready))


@router.post("/v2/repository/models/{model}/load", name="repository_load", openapi_extra=_LOAD_DOC,
             responses=answers(list[RepositoryIndexRow], 400, 401, 403, 404, 409,
                               description="The model's versions once loaded and switched to"))
async def load(request: Request, model: str) -> Response:
    _one_worker("load")
    config = config_override((await _body(request)).get("parameters", {}))
    await request.app.state.repository.load_model(model, config=config)
    return _rows(request, model)


@router.post("/v2/repository/models/{model}/unload", name="repository_unload", openapi_extra=_UNLOAD_DOC,
             responses=answers(list[RepositoryIndexRow], 400, 401, 403, 404, 409,
                               description="The model's versions once drained and unloaded"))
async def unload(request: Request, model: str) -> Response:
    _one_worker("unload")
    await _body(request)  # unload_dependents is accepted: deepserve models have no dependents
    await request.app.state.repository.unload_model(model)
    return _rows(request, model)
