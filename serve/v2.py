"""KServe v2 / Open Inference Protocol: the tensor codec (JSON and the binary tensor extension) and routes.

The infer body is parsed by hand (orjson, see ``http_util.parse_json``, + ``np.frombuffer`` views for
binary tensors), never by pydantic models, so large tensors cost one pass. BYTES elements are base64 strings
in JSON (Triton's convention for binary content) and 4-byte little-endian length-prefixed in binary.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import deepserve
from deepserve.serve.errors import BadRequest, NotReady
from deepserve.serve.http_util import (
    DEFAULT_MAX_JSON_DEPTH, DirectRoute, Reply, deadline_from, dump_json, headers_of,
    json_depth_limit, parse_json, read_body, require_json,
)
from deepserve.serve.schemas import (
    INFER_HEADER_PARAMETER, INFER_REQUEST_BODY, TIMEOUT_HEADER_PARAMETER, InferResponse, Live, ModelConfig,
    ModelIndex, ModelMetadata, ModelReady, Ready, ServerMetadata, answers, error_responses,
)
from deepserve.serve.servable import task_phrase
from deepserve.serve.metrics import worker_count

HEADER_LENGTH = "inference-header-content-length"
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
NP_TO_V2 = {np.dtype(v).name: k for k, v in DTYPES.items() if k != "BYTES"}
_DTYPE_TO_V2 = {np.dtype(v): k for k, v in DTYPES.items()}
"""By dtype object: a dict lookup, where ``dtype.name`` is a Python-level property (~2 µs) on every answer."""
_ORJSON_NUMPY = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                       np.uint32, np.uint64, np.float32, np.float64)}
"""Array dtypes orjson writes directly (OPT_SERIALIZE_NUMPY); others go through ``tolist()``."""



def v2_datatype(array: np.ndarray) -> str:
    found = _DTYPE_TO_V2.get(array.dtype)
    return found if found is not None else NP_TO_V2[array.dtype.name]  # e.g. a byte-swapped dtype


def _bytes_from_binary(buf: memoryview, name: str) -> list[bytes]:
    out, i = [], 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise BadRequest(f"input {name!r}: truncated BYTES element length at byte {i}")
        (n,) = struct.unpack_from("<I", buf, i)
        if i + 4 + n > len(buf):
            raise BadRequest(f"input {name!r}: BYTES element of {n} bytes runs past the tensor's data")
        out.append(bytes(buf[i + 4 : i + 4 + n]))
        i += 4 + n
    return out


def _bytes_from_json(data: Any, name: str) -> list[bytes]:
    out = []
    for element in _flatten(data):
        if not isinstance(element, str):
            raise BadRequest(f"input {name!r}: BYTES elements must be base64 strings in JSON, got {type(element).__name__}")
        try:
            out.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"input {name!r}: BYTES element is not valid base64") from None
    return out


def _flatten(data: Any) -> list:
    if not isinstance(data, list) or not data or not isinstance(data[0], list):
        return data if isinstance(data, list) else [data]
    return [x for d in data for x in _flatten(d)]


_NO_BINARY = memoryview(b"")


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it (binary extension), by Inference-Header-Content-Length."""
    if header_length is None:
        return body, _NO_BINARY
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def decode_request(body: bytes, header_length: str | None, max_depth: int = DEFAULT_MAX_JSON_DEPTH
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an infer request into its JSON header and ``{input name: array}``."""
    body, binary = _split_binary(body, header_length)
    request = parse_json(body, max_depth)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise BadRequest('infer request must be a JSON object with a non-empty "inputs" list')
    if not isinstance(request.get("id", ""), str):  # echoed in the answer, whose schema says string
        raise BadRequest(f"id must be a string, got {request['id']!r}")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(request["inputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest(f"inputs[{i}] must be an object with a string name")
        if spec["name"] in inputs:
            raise BadRequest(f"input {spec['name']!r} is given twice")
        inputs[spec["name"]], offset = _decode_input(spec, binary, offset)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data follow the inputs but no input claims them")
    return request, inputs


def _decode_input(spec: dict[str, Any], binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input's array from its spec (its JSON data, or its bytes of ``binary`` from ``offset``), and the
    offset of the next input's bytes."""
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if datatype not in DTYPES:
        raise BadRequest(f"input {name!r}: datatype must be one of {sorted(DTYPES)}, got {datatype!r}")
    if type(shape) is not list or not all([type(d) is int and d >= 0 for d in shape]):  # bool is not int here
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the body's binary data")
        buf = binary[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            return _object_array(_bytes_from_binary(buf, name), name, shape, count), offset
        dtype = np.dtype(DTYPES[datatype])
        if size != count * dtype.itemsize:
            raise BadRequest(f"input {name!r}: {size} bytes of binary data for shape {shape} of {datatype} "
                             f"(needs {count * dtype.itemsize})")
        return np.frombuffer(buf, dtype=dtype).reshape(shape), offset  # a view of the body
    if "data" not in spec:
        raise BadRequest(f"input {name!r} has neither data nor parameters.binary_data_size")
    if datatype == "BYTES":
        return _object_array(_bytes_from_json(spec["data"], name), name, shape, count), offset
    try:
        array = np.asarray(spec["data"], dtype=DTYPES[datatype])
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"input {name!r}: data does not hold {datatype} values ({e})") from None
    if array.size != count:
        raise BadRequest(f"input {name!r}: {array.size} values for shape {shape} (needs {count})")
    return array.reshape(shape), offset


def _object_array(elements: list[bytes], name: str, shape: list[int], count: int) -> np.ndarray:
    """BYTES elements as an object array of ``shape``."""
    if len(elements) != count:
        raise BadRequest(f"input {name!r}: {len(elements)} BYTES elements for shape {shape} (needs {count})")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _classification(logits: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: the top ``k`` as ``b"value:index:label"``, shape [B, k]."""
    k = min(k, logits.shape[-1])
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    out = np.empty(order.shape, dtype=object)
    for r, idx in enumerate(order):
        out[r] = [f"{logits[r, i]:f}:{i}:{labels[i] if i < len(labels) else i}".encode() for i in idx]
    return out


def _json_output(name: str, array: np.ndarray) -> dict[str, Any]:
    """One output with its values as JSON ``data``."""
    if array.dtype == object:
        data: Any = [b.decode("utf-8", "replace") for b in array.ravel()]
    else:
        data = array.ravel()
        if data.dtype not in _ORJSON_NUMPY:
            data = data.tolist()
    return {"name": name, "datatype": v2_datatype(array), "shape": list(array.shape), "data": data}


def _response_head(request: dict[str, Any], model: str, version: str, outputs: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if "id" in request:
        response["id"] = request["id"]
    return response


def encode_response(request: dict[str, Any], outputs: dict[str, np.ndarray], model: str, version: str,
                    labels: list[str]) -> Reply:
    params = request.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    wanted = request.get("outputs")
    if wanted is None and not default_binary:  # the usual request: every output, as JSON
        entries = [_json_output(name, array) for name, array in outputs.items()]
        return Reply(dump_json(_response_head(request, model, version, entries)))
    if wanted is None:
        wanted = [{"name": n} for n in outputs]
    if not isinstance(wanted, list):
        raise BadRequest('"outputs" must be a list of {"name": ...} objects')
    header_outputs, blobs = [], []
    for i, out in enumerate(wanted):
        if not isinstance(out, dict) or out.get("name") not in outputs:
            got = out.get("name") if isinstance(out, dict) else out
            raise BadRequest(f"outputs[{i}]: unknown output {got!r}; model {model} has {sorted(outputs)}")
        oparams = out.get("parameters") or {}
        array = outputs[out["name"]]
        k = oparams.get("classification")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise BadRequest(f"outputs[{i}].parameters.classification must be an integer >= 1, got {k!r}")
            array = _classification(array, k, labels)
        entry: dict[str, Any] = {"name": out["name"], "datatype": v2_datatype(array), "shape": list(array.shape)}
        if oparams.get("binary_data", default_binary):
            if array.dtype == object:
                blob = b"".join(struct.pack("<I", len(b)) + b for b in array.ravel())
            else:
                blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry = _json_output(out["name"], array)
        header_outputs.append(entry)
    header = dump_json(_response_head(request, model, version, header_outputs))
    if not blobs:
        return Reply(header)
    return Reply(b"".join([header, *blobs]), b"application/octet-stream",
                 headers={HEADER_LENGTH: str(len(header))})


router = APIRouter(tags=["v2 (KServe / Triton)"], route_class=DirectRoute)

_INFER_DOC = {
    "requestBody": INFER_REQUEST_BODY,
    "parameters": [INFER_HEADER_PARAMETER, TIMEOUT_HEADER_PARAMETER],
    "description": "JSON tensors, or the binary tensor extension (Inference-Header-Content-Length header). "
                   "BYTES inputs named like the image input hold encoded images (base64 in JSON).",
}
_INFER_RESPONSES = {
    200: {"model": InferResponse, "description": "The outputs as JSON; with binary outputs, the JSON header "
                                                 "then the raw bytes (Inference-Header-Content-Length).",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 404, 413, 415, 429, 503, 504),
}


@router.get("/v2", name="server_metadata", responses=answers(ServerMetadata))
async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "deepserve", "version": deepserve.__version__,
                         "extensions": ["binary_tensor_data", "classification", "model_repository"]})


@router.get("/v2/health/live", name="live", responses=answers(Live))
async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready", name="ready", responses=answers(Ready, 503))
async def ready(request: Request) -> Response:
    repository = request.app.state.repository
    workers = worker_count()
    ready_workers = 1 if workers == 1 or not repository.ready else repository.metrics.ready_workers()
    if repository.ready and ready_workers >= workers:
        return JSONResponse({"ready": True})
    if repository.ready:  # this worker is, not all of them (serve --workers)
        return JSONResponse({"ready": False, "error": f"{ready_workers} of {workers} worker processes have loaded "
                                                      f"their models"}, status_code=503)
    state = "stopping" if repository.stopping else "loading its models"
    return JSONResponse({"ready": False, "error": f"the server is {state}"}, status_code=503)


@router.get("/v2/models", name="models_index", responses=answers(ModelIndex))
async def models_index(request: Request) -> Response:
    return JSONResponse(request.app.state.repository.index())


def _metadata(request: Request, model: str, version: str | None) -> Response:
    repo = request.app.state.repository
    meta = repo.get(model, version).metadata()
    meta["versions"] = [str(v) for v in repo.model(model).versions]
    return JSONResponse(meta)


@router.get("/v2/models/{model}", name="model_metadata", responses=answers(ModelMetadata, 404, 503))
async def model_metadata(request: Request, model: str) -> Response:
    return _metadata(request, model, None)


@router.get("/v2/models/{model}/versions/{version}", name="model_metadata", responses=answers(ModelMetadata, 404, 503))
async def model_version_metadata(request: Request, model: str, version: str) -> Response:
    return _metadata(request, model, version)


def _config(request: Request, model: str, version: str | None) -> Response:
    servable = request.app.state.repository.get(model, version)
    meta = servable.metadata()
    settings = getattr(servable, "settings", None) or request.app.state.repository.model(model).settings
    return JSONResponse({
        "name": model, "platform": meta["platform"], "max_batch_size": settings.max_batch_size,
        "input": meta["inputs"], "output": meta["outputs"],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)},
        "instance_group": [{"count": settings.instances}],
        "parameters": {"precision": settings.precision, "backend": settings.backend}})


@router.get("/v2/models/{model}/config", name="model_config", responses=answers(ModelConfig, 404, 503))
async def model_config(request: Request, model: str) -> Response:
    return _config(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/config", name="model_config",
            responses=answers(ModelConfig, 404, 503))
async def model_version_config(request: Request, model: str, version: str) -> Response:
    return _config(request, model, version)


def _ready(request: Request, model: str, version: str | None) -> Response:
    try:
        request.app.state.repository.get(model, version)  # NotFound (404) for an unknown model or version
    except NotReady as e:
        return JSONResponse({"name": model, "ready": False, "error": e.message}, status_code=503)
    return JSONResponse({"name": model, "ready": True})


@router.get("/v2/models/{model}/ready", name="model_ready", responses=answers(ModelReady, 404, 503))
async def model_ready(request: Request, model: str) -> Response:
    return _ready(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/ready", name="model_ready", responses=answers(ModelReady, 404, 503))
async def model_version_ready(request: Request, model: str, version: str) -> Response:
    return _ready(request, model, version)


async def _infer(request: Request, model: str, version: str | None) -> Reply:
    servable = request.app.state.repository.get(model, version)
    if not hasattr(servable, "infer"):
        raise BadRequest(f"model {model!r} is {task_phrase(servable.manifest.task)} and does not take tensor "
                         f"infer requests; use POST /v2/models/{model}/generate")
    servable.check_admission(deadline_from(request))  # shed before reading and decoding the body
    header_length = headers_of(request).get(HEADER_LENGTH)
    if header_length is None:
        require_json(request, also=("application/octet-stream",))  # tritonclient's type for JSON too
    body = await read_body(request)
    payload, inputs = decode_request(body, header_length, json_depth_limit(request))
    params = payload.get("parameters")
    deadline = deadline_from(request, params.get("timeout") if isinstance(params, dict) else None)
    outputs = await servable.infer(inputs, deadline=deadline)
    return encode_response(payload, outputs, model, str(servable.manifest.version),
                           getattr(servable, "labels", []))


@router.post("/v2/models/{model}/infer", name="infer", openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES)
async def infer(request: Request, model: str) -> Reply:
    return await _infer(request, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", name="infer", openapi_extra=_INFER_DOC,
             responses=_INFER_RESPONSES)
async def infer_version(request: Request, model: str, version: str) -> Reply:
    return await _infer(request, model, version)
