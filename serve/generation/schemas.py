"""OpenAPI declarations of the generation routes: request bodies and response shapes as pydantic models.

The routes read their bodies by hand (``routes.read_json``: field-named errors from ``GenerationParams``,
invalid UTF-8 tolerated) and answer plain dicts, so nothing here runs per request. Request bodies are JSON
schemas derived from the one declaration of the generation parameters (``deepserve.generation``), inlined into
each operation's ``openapi_extra``; response models are declared through ``responses=`` and land in
``components/schemas``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from deepserve.generation import parameter_schema, parameters_schema
from deepserve.serve.schemas import TIMEOUT_HEADER_PARAMETER, ErrorBody

# ---- Triton generate extension -----------------------------------------------------------------------------


def generate_request_schema() -> dict[str, Any]:
    """The generate body: ``text_input``, ``parameters`` (``deepserve.generation``'s schema, plus Triton clients'
    ``stream``) and an optional string ``id``."""
    params = parameters_schema()
    params["properties"]["stream"] = {"type": ["boolean", "null"], "description": "Accepted and ignored: the "
                                                                                 "endpoint decides."}
    return {"type": "object", "additionalProperties": False, "required": ["text_input"], "properties": {
        "text_input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                                      "maxItems": 1}],
                       "description": "The prompt (a seq2seq model's source sentence, at least one token)."},
        "parameters": {"anyOf": [params, {"type": "null"}]},
        "id": {"type": ["string", "null"], "description": "Echoed in the response."}}}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GeneratedSequence(BaseModel):
    """One returned sequence (n-best beam hypotheses or samples, best first)."""

    index: int
    text_output: str
    finish_reason: Literal["length", "eos", "stop"]
    num_tokens: int
    score: Optional[float] = Field(None, description="Beam search: the length-penalised score.")
    tokens: Optional[list[str]] = Field(None, description="With logprobs: each generated token's text.")
    logprobs: Optional[list[float]] = Field(None, description="With logprobs: each generated token's log-prob.")
    top_logprobs: Optional[list[dict[str, float]]] = Field(None, description="With logprobs=k > 0: the k most "
                                                                             "likely tokens per position.")


class GenerateResponse(BaseModel):
    """Answer of ``/generate``: the best sequence's text, plus ``sequences`` when n > 1 or logprobs asked."""

    model_name: str
    model_version: str
    text_output: str
    finish_reason: Literal["length", "eos", "stop"]
    usage: Usage
    id: Optional[str] = None
    score: Optional[float] = None
    sequences: Optional[list[GeneratedSequence]] = None


class GenerateStreamEvent(BaseModel):
    """One server-sent event of ``/generate_stream`` (``data: {...}``). Beam search streams the prefix every
    beam agrees on to every index, then one final event per returned sequence. ``tokens`` / ``logprobs`` /
    ``top_logprobs`` come with logprobs: the tokens generated since the previous event of that index (beam
    search: all of them, in each sequence's final event). An error mid-stream is ``{"error", "status"}``."""

    model_name: str
    model_version: str
    index: int
    text_output: str
    finish_reason: Optional[Literal["length", "eos", "stop"]] = None
    score: Optional[float] = Field(None, description="Beam search, in each sequence's final event: its "
                                                     "length-penalised score.")
    tokens: Optional[list[str]] = None
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[str, float]]] = None


TritonError = ErrorBody  # the v2 error shape is the serving core's


# ---- OpenAI-compatible ---------------------------------------------------------------------------------------


OPENAI_TO_OURS = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "min_tokens": "min_new_tokens",
                  **{name: name for name in ("temperature", "top_p", "seed", "stop", "logprobs", "top_k", "num_beams",
                                             "length_penalty", "early_stopping", "repetition_penalty",
                                             "no_repeat_ngram_size")}}
"""OpenAI completion field -> ``GenerationParams`` field (after ``stream``, the extensions the SDK sends through
``extra_body``)."""
OURS_TO_OPENAI = {ours: openai for openai, ours in OPENAI_TO_OURS.items()}
_OPENAI_DEFAULTS = {"max_tokens": 16}
_OPENAI_DOCS = {"max_tokens": "Most tokens to generate (default 16).", "n": "Choices per prompt (samples, or the n "
                "best beam hypotheses).", "min_tokens": "EOS and stop strings are ignored before this many tokens."}
_OPENAI_MINIMUM = {"top_k": -1}  # -1 disables, as 0 does


def _openai_field(openai: str) -> dict[str, Any]:
    """A generation parameter as a completion field: its schema, renamed, OpenAI's default, null accepted."""
    schema = parameter_schema(OPENAI_TO_OURS[openai])
    meta = {"default": _OPENAI_DEFAULTS.get(openai, schema.pop("default")),
            "description": _OPENAI_DOCS.get(openai, schema.pop("description"))}
    options = schema["anyOf"] if "anyOf" in schema else [schema]
    if openai in _OPENAI_MINIMUM:
        options = [{**o, "minimum": _OPENAI_MINIMUM[openai]} if o.get("type") == "integer" else o for o in options]
    return {"anyOf": [o for o in options if o != {"type": "null"}] + [{"type": "null"}], **meta}


def _completion_fields() -> dict[str, dict[str, Any]]:
    fields: dict[str, dict[str, Any]] = {
        "model": {"type": "string", "minLength": 1, "description": "Model name, or name:version."},
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
        "stream": {"type": ["boolean", "null"], "default": False},
        "use_beam_search": {"type": ["boolean", "null"], "default": False},
        **{openai: _openai_field(openai) for openai in OPENAI_TO_OURS}}
    for name, what in (("user", "Ignored."), ("suffix", "Ignored."), ("best_of", "Ignored."),
                       ("presence_penalty", "Only 0 (use repetition_penalty)."),
                       ("frequency_penalty", "Only 0 (use repetition_penalty)."), ("logit_bias", "Ignored."),
                       ("stream_options", "Ignored."), ("echo", "Only false.")):
        fields[name] = {"description": what}
    return fields


COMPLETION_FIELDS = _completion_fields()
"""Every field of a completion request and its schema."""


def completion_request_schema() -> dict[str, Any]:
    """OpenAI ``/v1/completions`` body; the generation fields are ``deepserve.generation``'s, renamed."""
    return {"type": "object", "additionalProperties": False, "required": ["model", "prompt"],
            "properties": COMPLETION_FIELDS}


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int] = Field(description="Offset of each token in the choice's text (streaming: in the "
                                               "text of all chunks of that choice so far).")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["length", "eos", "stop"]] = Field(description="null in a streamed chunk until "
                                                                                  "the choice's last one.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """``text_completion`` object; with ``stream`` every server-sent event is one ``CompletionChunk`` and the
    stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunk(BaseModel):
    """One streamed chunk: a single choice's new text (and its tokens' logprobs when asked)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(BaseModel):
    """OpenAI's error shape (the SDK shows ``error.message``); also sent as an event when a stream fails."""

    error: OpenAIErrorDetail


# ---- declaring them -----------------------------------------------------------------------------------------


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every local ``$ref`` replaced by its definition (operation bodies have no ``$defs``)."""
    if isinstance(schema, dict):
        if "$ref" in schema and schema["$ref"].startswith("#/$defs/"):
            return _inline(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with no references (for places FastAPI does not collect into components)."""
    schema = model.model_json_schema()
    return _inline(schema, schema.get("$defs", {}))


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``schema`` as the required JSON request body (and the deadline header every
    generation route reads)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "parameters": [TIMEOUT_HEADER_PARAMETER]}


def sse_event(data: type[BaseModel], error: type[BaseModel], *, done: str | None = None) -> dict[str, Any]:
    """The schema of one server-sent event (what OpenAPI 3.1's ``text/event-stream`` ``schema`` describes): its
    ``data`` is a JSON ``data`` object, a JSON ``error`` (a stream that fails), or the literal ``done``."""
    payload: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                               "contentSchema": {"anyOf": [inline_schema(data), inline_schema(error)]}}
    if done is not None:
        payload = {"anyOf": [{"const": done}, payload]}
    return {"type": "object", "required": ["data"], "properties": {"data": payload}}


class StreamError(BaseModel):
    """The last event of a ``/generate_stream`` that fails."""

    error: str
    status: int


def responses(ok: type[BaseModel], error: type[BaseModel], *, stream: type[BaseModel] | None = None
              ) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: 200 as ``ok`` (JSON), or as server-sent events of ``stream`` objects."""
    out: dict[int | str, dict[str, Any]] = {}
    if stream is None:
        out[200] = {"model": ok, "description": "Success"}
    else:
        out[200] = {"description": f"Server-sent events, each `data: <{stream.__name__}>`",
                    "content": {"text/event-stream": {"schema": sse_event(stream, StreamError)}}}
    for status, what in ((400, "Invalid request"), (404, "Unknown model or version"),
                         (429, "Too many waiting requests"), (503, "Model not ready"),
                         (504, "Deadline passed")):
        out[status] = {"model": error, "description": what}
    return out
