"""OpenAI-compatible completions: ``POST /v1/completions`` (plain and ``stream``) and ``GET /v1/models``.

Fields: model, prompt (a string or a list), max_tokens (16), temperature (1), top_p, n, stream, seed, stop, logprobs;
extensions (``extra_body``): top_k (-1 or 0 off), use_beam_search, num_beams (n with beam search, as in vLLM),
length_penalty, early_stopping, repetition_penalty, min_tokens, no_repeat_ngram_size. Errors name the OpenAI field
in OpenAI's shape (``OpenAIRoute``), also as a failing stream's last event. Streamed chunks carry the logprobs of
the tokens since their choice's previous chunk (beam search: all in the final chunk).
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, Callable, Coroutine

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from deepserve.serve.errors import BadRequest, NotFound, ServeError

from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Job, Output, Result, TokenLogprobs
from deepserve.serve.generation.params import GenerationParams, InvalidParameter, check
from deepserve.serve.generation.routes import EventStream, Piece, generation_servable, read_json, run_to_results, sse
from deepserve.serve.generation.schemas import (
    COMPLETION_FIELDS, OPENAI_TO_OURS, OURS_TO_OPENAI, Completion, CompletionChunk, ModelList, OpenAIError,
    completion_request_schema, request_body, responses, sse_event)
from deepserve.serve.http_util import deadline_from

# ---- OpenAI's error shape -----------------------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
                 504: "timeout_error"}


def openai_error(error: ServeError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, what the openai SDK reads into ``APIError``; ``param``
    is the request field an ``InvalidParameter`` names."""
    code = "model_not_found" if isinstance(error, NotFound) else "rate_limit_exceeded" if error.status == 429 else None
    return {"error": {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "server_error"),
                      "param": error.parameter if isinstance(error, InvalidParameter) else None, "code": code}}


class OpenAIRoute(APIRoute):
    """Routes under /v1 answer errors in OpenAI's shape. The app's handlers (``serve/app.py``) answer
    ``{"error": "..."}`` for every route, so /v1 catches its errors here, before they reach them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as e:
                if e.reject_reason is not None:
                    request.app.state.repository.metrics.reject(e.reject_reason)
                return JSONResponse(openai_error(e), status_code=e.status, headers=e.headers)
            except RequestValidationError as e:
                problems = [f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', 'invalid')}"
                            for err in e.errors()]
                return JSONResponse(openai_error(BadRequest("; ".join(problems) or "invalid request")), status_code=400)

        return openai_errors


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)

def to_params(body: dict[str, Any]) -> GenerationParams:
    """The ``GenerationParams`` of a completion request; errors name the OpenAI field."""
    unknown = sorted(set(body) - set(COMPLETION_FIELDS))
    if unknown:
        raise InvalidParameter.of(unknown[0], f"is not a completion field (unknown: {unknown})", body[unknown[0]])
    check(not body.get("echo"), "echo", "is not supported", body.get("echo"))
    for name in ("presence_penalty", "frequency_penalty"):
        check(body.get(name) in (None, 0, 0.0), name, "is not supported (use repetition_penalty)", body.get(name))
    raw: dict[str, Any] = {"max_new_tokens": 16}
    raw.update({OPENAI_TO_OURS[k]: v for k, v in body.items() if k in OPENAI_TO_OURS and v is not None})
    if raw.get("top_k") == -1:
        raw["top_k"] = 0
    use_beam = body.get("use_beam_search", False)
    check(isinstance(use_beam, bool), "use_beam_search", "must be true or false", use_beam)
    if use_beam and "num_beams" not in raw:
        raw["num_beams"] = raw.get("num_return_sequences", 1)
        check(raw["num_beams"] > 1, "use_beam_search", "needs num_beams > 1 (or n > 1)", use_beam)
    return GenerationParams.from_dict(raw)


def openai_named(error: InvalidParameter) -> InvalidParameter:
    """``error`` naming the OpenAI field (``max_tokens``, not ``max_new_tokens``)."""
    name = OURS_TO_OPENAI.get(error.parameter)
    if name is None or name == error.parameter:
        return error
    return InvalidParameter(error.error.renamed(name), reject_reason=error.reject_reason)


def _prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    check(isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) for p in prompt), "prompt",
          "must be a string or a non-empty list of strings", prompt)
    return prompt


def _logprobs_json(lp: TokenLogprobs, tok: Any, offset: int = 0) -> tuple[dict[str, Any], int]:
    """OpenAI's logprobs object for these tokens, their text offsets starting at ``offset``; and the offset
    after them (streaming continues from there in the choice's next chunk)."""
    tokens = [tok.token_text(t) for t in lp.token_ids]
    *offsets, at = itertools.accumulate(map(len, tokens), initial=offset)
    tops = [{tok.token_text(t): v for t, v in row} for row in lp.top_logprobs] or None
    return {"tokens": tokens, "token_logprobs": lp.logprobs, "top_logprobs": tops, "text_offset": offsets}, at


def _output_logprobs(o: Output, tok: Any) -> dict[str, Any] | None:
    lp = o.token_logprobs()
    return None if lp is None else _logprobs_json(lp, tok)[0]


def _usage(results: list[Result]) -> dict[str, int]:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/v1/completions", summary="OpenAI-compatible text completion", response_model=None,
             openapi_extra=request_body(completion_request_schema()),
             responses={**responses(Completion, OpenAIError), 200: {
                 "model": Completion, "description": "A text_completion object; with stream, server-sent events "
                                                     "of CompletionChunk objects ending with `data: [DONE]`",
                 "content": {"text/event-stream": {"schema": sse_event(CompletionChunk, OpenAIError, done="[DONE]")}}}})
async def completions(request: Request):
    body = await read_json(request)
    model = body.get("model")
    check(isinstance(model, str) and bool(model), "model", "must be a model name", model)
    name, _, version = model.partition(":")
    servable = generation_servable(request, name, version or None)
    stream = body.get("stream", False)
    check(isinstance(stream, bool), "stream", "must be true or false", stream)
    jobs: list[Job] = []
    deadline = deadline_from(request)
    try:
        prompts, params = _prompts(body), to_params(body)
        for p in prompts:
            jobs.append(servable.submit(p, params, stream=stream, deadline=deadline))
    except BaseException as e:
        for j in jobs:
            servable.cancel(j)
        if isinstance(e, InvalidParameter):
            raise openai_named(e) from None
        raise
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}
    n = params.num_return_sequences
    if stream:
        return _stream(servable, jobs, head, n)

    results = await run_to_results(request, servable, jobs)
    choices = [{"index": i * n + o.index, "text": o.text, "logprobs": _output_logprobs(o, servable.tokenizer),
         "finish_reason": o.finish_reason}
        for i, r in enumerate(results) for o in r.outputs
    ]
    return {**head, "choices": choices, "usage": _usage(results)}


def _stream(servable: GenerationServable, jobs: list[Job], head: dict[str, Any], n: int) -> EventStream:
    tok = servable.tokenizer
    offsets: dict[int, int] = {}  # choice -> text offset of its next token (logprobs.text_offset)

    def chunk(i: int, piece: Piece) -> bytes:
        index, text, finish, lp, _ = piece  # OpenAI's chunks carry no score
        index += i * n  # prompt i's choices
        logprobs = None
        if lp is not None:
            logprobs, offsets[index] = _logprobs_json(lp, tok, offsets.get(index, 0))
        return sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    return EventStream(servable, jobs, chunk, lambda e: sse(openai_error(e)), b"data: [DONE]\n\n")


@router.get("/v1/models", summary="OpenAI-compatible model list (generation models)", response_model=None,
            responses={200: {"model": ModelList, "description": "Ready generation models"}})
async def models(request: Request) -> dict[str, Any]:
    repository = request.app.state.repository
    data = []
    for m in repository.index()["models"]:
        if m.get("task") in ("char-lm", "seq2seq") and m.get("ready"):
            data.append({"id": m["name"], "object": "model", "created": 0, "owned_by": "deepserve"})
    return {"object": "list", "data": data}
