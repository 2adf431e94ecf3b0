"""What the JSON routes answer and what the v2 infer route takes, for OpenAPI (``/docs``, ``/openapi.json``).

The response models are declared through the routes' ``responses`` (documentation only): handlers build plain
dicts and JSON bytes, so no answer — least of all a tensor — goes through pydantic at request time. The
tests validate real answers against these models, so the documentation cannot drift from the wire.

The infer request is parsed by hand (``v2.decode_request``); ``INFER_REQUEST_BODY`` is its OpenAPI request
body: the JSON form and the binary tensor extension.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from deepserve.serve.http_util import MAX_TIMEOUT_MS, TIMEOUT_HEADER
from deepserve.serve.model_state import ModelState


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="What went wrong, naming the field, header or parameter at fault.")
    code: str | None = Field(None, description="For some errors, what kind: `overloaded` (429, or a 503 of a "
                                               "full queue: retry later), `model_unavailable` (503: the model "
                                               "is not loaded or not ready), `unauthorized`, `forbidden`, "
                                               "`load_failed`.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class VersionStatus(BaseModel):
    version: str
    ready: bool
    reason: str | None = Field(description="Why this version is not ready, else null.")


class ModelIndexEntry(BaseModel):
    name: str
    versions: list[str] = Field(description="Every version directory found, ready or not.")
    ready: bool = Field(description="Whether a request naming no version is served now.")
    reason: str | None = Field(description="Why the model or one of its versions is not ready, else null.")
    task: str | None = Field(description="image-classification, char-lm or seq2seq; null if no manifest loaded.")
    version_status: list[VersionStatus]


class ModelIndex(BaseModel):
    models: list[ModelIndexEntry]


class RepositoryIndexRow(BaseModel):
    """Triton's repository index: one row per model version."""

    name: str
    version: str
    state: Literal[tuple(s.value for s in ModelState)]  # type: ignore[valid-type]  # the enum's values
    reason: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="KServe v2 datatype: FP32, INT64, BYTES...")
    shape: list[int] = Field(description="-1 for a dynamic axis (the batch).")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str = Field(description="Runtime in use: onnxruntime_onnx, pytorch_libtorch...")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="task; for classifiers the number of labels; for "
                                                   "generation models the endpoints.")


class ModelReady(BaseModel):
    name: str
    ready: bool


class ModelConfig(BaseModel):
    """A Triton-style view of the model's serving settings."""

    name: str
    platform: str
    max_batch_size: int
    input: list[TensorMetadata]
    output: list[TensorMetadata]
    dynamic_batching: dict[str, int]
    instance_group: list[dict[str, int]]
    parameters: dict[str, str] = Field(default_factory=dict, description="precision (fp32, int8, fp16) and the "
                                                                        "backend setting (auto, onnx, torchscript).")


class BinaryDataSize(BaseModel):
    binary_data_size: int = Field(description="Bytes of this tensor after the JSON header (binary extension).")


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="Row-major values; absent when sent as binary data. "
                                                     "BYTES values are UTF-8 strings.")
    parameters: BinaryDataSize | None = None


class InferResponse(BaseModel):
    """The JSON answer, or the JSON header of a binary answer (``Inference-Header-Content-Length`` bytes,
    followed by each binary output's raw bytes in order)."""

    model_name: str
    model_version: str
    id: str | None = Field(None, description="The request's id, echoed when it had one.")
    outputs: list[InferOutput]


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


PredictionsResponse = Union[list[Prediction], list[list[Prediction]]]
"""One image: the top-k list; a multipart upload of several files: one list per file, in upload order."""


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody} for s in statuses}


def answers(model: Any, *also: int, description: str = "Successful Response") -> dict[int | str, dict[str, Any]]:
    """``responses`` for a JSON route: ``model`` at 200 and the error body at ``also``."""
    return {200: {"model": model, "description": description}, **error_responses(*also)}


# ---- the v2 infer request (parsed by hand; this is its documentation) -------------------------------------

_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
              "FP64", "BYTES"]
_INFER_INPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": _DATATYPES},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "items": {},
                 "description": "Row-major values (nested lists are flattened). BYTES values are base64 strings; "
                                "BYTES inputs named like the image input hold encoded images."},
        "parameters": {"type": "object", "properties": {
            "binary_data_size": {"type": "integer", "minimum": 0,
                                 "description": "Binary extension: this input's bytes follow the JSON header "
                                                "instead of data."}}},
    },
}
_INFER_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "parameters": {"type": "object", "properties": {
            "binary_data": {"type": "boolean", "description": "Answer this output as binary data."},
            "classification": {"type": "integer", "minimum": 1,
                               "description": "Triton's classification extension: the top k as "
                                              "\"value:index:label\" BYTES."}}},
    },
}
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "title": "InferRequest",
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "Echoed in the answer."},
        "inputs": {"type": "array", "minItems": 1, "items": _INFER_INPUT},
        "outputs": {"type": "array", "items": _INFER_OUTPUT,
                    "description": "Which outputs to answer, and how; default all, as JSON."},
        "parameters": {"type": "object", "properties": {
            "binary_data_output": {"type": "boolean", "description": "Default of outputs[].parameters.binary_data."},
            "timeout": {"type": "integer", "minimum": 0,
                        "description": "Deadline in microseconds (0: none); the x-request-timeout-ms header wins."}}},
    },
}
INFER_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": INFER_REQUEST_SCHEMA},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Binary tensor extension: the JSON request (schema as for application/json) of "
                           "Inference-Header-Content-Length bytes, then each input's raw bytes in input order.",
        },
    },
}
INFER_HEADER_PARAMETER: dict[str, Any] = {
    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "Binary tensor extension: length of the JSON header at the start of the body.",
}
TIMEOUT_HEADER_PARAMETER: dict[str, Any] = {
    "name": TIMEOUT_HEADER, "in": "header", "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_MS},
    "description": "Relative deadline in milliseconds (at most a day); past it the request answers 504.",
}
