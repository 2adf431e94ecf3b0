"""OpenAPI declarations of the generation routes: request bodies and response shapes as pydantic models.

The routes still read their bodies by hand (``http_common.read_json``: field-named error messages from
``GenerationParams``, invalid UTF-8 tolerated) and answer plain dicts, so nothing here runs per request:
request models are inlined into each operation's ``openapi_extra``; response models are declared through
``responses=`` and land in ``components/schemas``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from deepserve.serve.schemas import ErrorBody

# ---- Triton generate extension -----------------------------------------------------------------------------


class GenerateParameters(BaseModel):
    """``parameters`` of a generate request (``GenerationParams``); unknown keys are refused with 400."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate (default 64 or the "
                                                                   "server's cap).")
    min_new_tokens: int = Field(0, ge=0, description="EOS and stop strings are ignored before this many tokens.")
    temperature: float = Field(1.0, ge=0, le=100, description="0 is greedy decoding.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 disables.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL-style penalty; 1 disables.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size; 0 disables.")
    seed: Optional[int] = Field(None, ge=0, description="Seed of the request's own generator (sampling).")
    stop: Union[str, list[str], None] = Field(None, description="Stop strings (at most 16).")
    num_beams: int = Field(1, ge=1, description="Beam width; > 1 selects beam search.")
    length_penalty: float = Field(1.0, ge=-10, le=10, description="Beam score = sum logprobs / length ** this.")
    early_stopping: Union[bool, Literal["never"]] = Field(False, description="Beam search stop rule (Hugging "
                                                                             "Face).")
    num_return_sequences: int = Field(1, ge=1, description="Samples, or n best beam hypotheses.")
    logprobs: Union[bool, int, None] = Field(None, description="true, or 0-5 alternatives per token.")
    stream: Optional[bool] = Field(None, description="Accepted and ignored: the endpoint decides.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_input: Union[str, list[str]] = Field(description="The prompt (a seq2seq model's source sentence); a "
                                                          "list must hold exactly one string.")
    parameters: Optional[GenerateParameters] = None
    id: Optional[str] = Field(None, description="Echoed in the response.")


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


class CompletionRequest(BaseModel):
    """OpenAI ``/v1/completions`` body; fields after ``echo`` are extensions (``extra_body`` in the SDK)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model name, or name:version.")
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0, le=100)
    top_p: Optional[float] = Field(1.0, gt=0, le=1)
    n: Optional[int] = Field(1, ge=1)
    stream: Optional[bool] = False
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    user: Optional[str] = Field(None, description="Ignored.")
    suffix: Optional[str] = Field(None, description="Ignored.")
    best_of: Optional[int] = Field(None, description="Ignored.")
    presence_penalty: Optional[float] = Field(None, description="Only 0 (use repetition_penalty).")
    frequency_penalty: Optional[float] = Field(None, description="Only 0 (use repetition_penalty).")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Ignored.")
    stream_options: Optional[dict[str, Any]] = Field(None, description="Ignored.")
    echo: Optional[bool] = Field(None, description="Only false.")
    top_k: Optional[int] = Field(None, ge=-1, description="-1 or 0 disables.")
    use_beam_search: Optional[bool] = False
    num_beams: Optional[int] = Field(None, ge=1, description="Defaults to n with use_beam_search.")
    length_penalty: Optional[float] = None
    early_stopping: Union[bool, Literal["never"], None] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = Field(None, ge=0)
    no_repeat_ngram_size: Optional[int] = Field(None, ge=0)


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


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the required JSON request body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}}


def responses(ok: type[BaseModel], error: type[BaseModel], *, stream: type[BaseModel] | None = None
              ) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: 200 as ``ok`` (JSON), or as server-sent events of ``stream`` objects."""
    out: dict[int | str, dict[str, Any]] = {}
    if stream is None:
        out[200] = {"model": ok, "description": "Success"}
    else:
        out[200] = {"description": f"Server-sent events, each `data: <{stream.__name__}>`",
                    "content": {"text/event-stream": {"schema": inline_schema(stream)}}}
    for status, what in ((400, "Invalid request"), (404, "Unknown model or version"),
                         (429, "Too many waiting requests"), (503, "Model not ready"),
                         (504, "Deadline passed")):
        out[status] = {"model": error, "description": what}
    return out
