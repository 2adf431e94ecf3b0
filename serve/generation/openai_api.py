"""OpenAI-compatible completions: ``POST /v1/completions`` (plain and ``stream``) and ``GET /v1/models``.

Standard fields: model, prompt (a string or a list of strings), max_tokens (default 16), temperature
(default 1), top_p, n, stream, seed, stop, logprobs. Extensions (the SDK sends them through ``extra_body``):
top_k (-1 or 0 disables), use_beam_search, num_beams (defaults to n with use_beam_search, as in vLLM),
length_penalty, early_stopping, repetition_penalty, min_tokens, no_repeat_ngram_size. A seq2seq model takes
its source sentence as the prompt. Error messages name the OpenAI field (``max_tokens``, not
``max_new_tokens``) and come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
(``http_common.OpenAIRoute``), also as the last event of a stream that fails. With ``stream`` and
``logprobs``, each chunk carries the logprobs of the tokens generated since the previous chunk of its choice
(beam search: all of them in each choice's final chunk).
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from deepserve.serve.errors import BadRequest, ServeError
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.http_common import (
    SSE_HEADERS, OpenAIRoute, abandon, cancel_on_disconnect, generation_servable, openai_error, read_json, sse,
)
from deepserve.serve.generation.jobs import Event, Job, Output, Result, TokenLogprobs
from deepserve.serve.generation.params import GenerationParams
from deepserve.serve.generation.schemas import (
    Completion, CompletionChunk, CompletionRequest, ModelList, OpenAIError, inline_schema, json_body, responses,
)
from deepserve.serve.http_util import deadline_from

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)

# OpenAI field -> GenerationParams field
_RENAMED = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "min_tokens": "min_new_tokens"}
_PASSED = ("temperature", "top_p", "seed", "stop", "logprobs", "top_k", "num_beams", "length_penalty",
           "early_stopping", "repetition_penalty", "no_repeat_ngram_size")
_IGNORED = ("user", "suffix", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "stream_options",
            "echo")
_KNOWN = {"model", "prompt", "stream", "use_beam_search", *_RENAMED, *_PASSED, *_IGNORED}


def _openai_name(message: str) -> str:
    for openai, ours in _RENAMED.items():
        if message.startswith(ours):
            return openai + message[len(ours):]
    return message


def to_params(body: dict[str, Any]) -> GenerationParams:
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}")
    if body.get("echo"):
        raise BadRequest("echo is not supported, got True")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported (use repetition_penalty), got {body[name]!r}")
    raw: dict[str, Any] = {"max_new_tokens": 16}
    for openai, ours in _RENAMED.items():
        if body.get(openai) is not None:
            raw[ours] = body[openai]
    for name in _PASSED:
        if body.get(name) is not None:
            raw[name] = body[name]
    if raw.get("top_k") == -1:
        raw["top_k"] = 0
    use_beam = body.get("use_beam_search", False)
    if not isinstance(use_beam, bool):
        raise BadRequest(f"use_beam_search must be true or false, got {use_beam!r}")
    if use_beam and "num_beams" not in raw:
        raw["num_beams"] = raw.get("num_return_sequences", 1)
        if raw["num_beams"] == 1:
            raise BadRequest("use_beam_search needs num_beams > 1 (or n > 1), got num_beams=1")
    try:
        return GenerationParams(**raw)
    except BadRequest as e:
        raise BadRequest(_openai_name(e.message)) from None


def _prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise BadRequest(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")


def _logprobs_json(lp: TokenLogprobs, tok: Any, offset: int = 0) -> tuple[dict[str, Any], int]:
    """OpenAI's logprobs object for these tokens, their text offsets starting at ``offset``; and the offset
    after them (streaming continues from there in the choice's next chunk)."""
    tokens = [tok.token_text(t) for t in lp.token_ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = [{tok.token_text(t): v for t, v in row} for row in lp.top_logprobs] or None
    return {"tokens": tokens, "token_logprobs": lp.logprobs, "top_logprobs": tops, "text_offset": offsets}, at


def _output_logprobs(o: Output, tok: Any) -> dict[str, Any] | None:
    if o.logprobs is None:
        return None
    n = len(o.logprobs)
    return _logprobs_json(TokenLogprobs(o.token_ids[:n], o.logprobs, o.top_logprobs or []), tok)[0]


def _usage(results: list[Result]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/v1/completions", summary="OpenAI-compatible text completion", response_model=None,
             openapi_extra=json_body(CompletionRequest),
             responses={**responses(Completion, OpenAIError), 200: {
                 "model": Completion, "description": "A text_completion object; with stream, server-sent events "
                                                     "of CompletionChunk objects ending with `data: [DONE]`",
                 "content": {"text/event-stream": {"schema": inline_schema(CompletionChunk)}}}})
async def completions(request: Request):
    body = await read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(f"model must be a model name, got {model!r}")
    name, _, version = model.partition(":")
    servable = generation_servable(request, name, version or None)
    prompts = _prompts(body)
    params = to_params(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}")
    jobs: list[Job] = []
    deadline = deadline_from(request)
    try:
        for p in prompts:
            jobs.append(servable.submit(p, params, stream=stream, deadline=deadline))
    except BaseException as e:
        for j in jobs:
            servable.cancel(j)
        if isinstance(e, BadRequest):
            raise BadRequest(_openai_name(e.message)) from None
        raise
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model}
    n = params.num_return_sequences
    if stream:
        return StreamingResponse(_stream(servable, jobs, head, n), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    def cancel_all() -> None:
        for j in jobs:
            abandon(servable, j)

    async with cancel_on_disconnect(request, cancel_all):
        results = [await servable.wait(j) for j in jobs]
    choices = [
        {"index": i * n + o.index, "text": o.text, "logprobs": _output_logprobs(o, servable.tokenizer),
         "finish_reason": o.finish_reason}
        for i, r in enumerate(results) for o in r.outputs
    ]
    return {**head, "choices": choices, "usage": _usage(results)}


async def _stream(servable: GenerationServable, jobs: list[Job], head: dict[str, Any], n: int) -> AsyncIterator[bytes]:
    tok = servable.tokenizer
    offsets: dict[int, int] = {}  # choice -> text offset of its next token (logprobs.text_offset)

    def chunk(index: int, text: str, finish: str | None, lp: TokenLogprobs | None) -> bytes:
        logprobs = None
        if lp is not None:
            logprobs, offsets[index] = _logprobs_json(lp, tok, offsets.get(index, 0))
        return sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish}]})

    def render(i: int, job: Job, event: Event, out: list[bytes]) -> None:
        if event.kind == "delta":
            indices = range(n) if event.index < 0 else [event.index]
            for k in indices:
                out.append(chunk(i * n + k, event.text, event.extra.get("finish_reason"), event.extra.get("logprobs")))
        elif event.result is not None:
            for o in event.result.outputs:
                rest = job.remaining_text(o.index, o.text)
                lp = job.final_logprobs(o)
                if job.is_beam or rest or lp is not None:
                    out.append(chunk(i * n + o.index, rest, o.finish_reason, lp))

    try:
        for i, job in enumerate(jobs):  # several prompts: one after the other (all were queued at once)
            async with aclosing(servable.event_batches(job)) as batches:  # a client gone cancels the job now
                async for batch in batches:
                    out: list[bytes] = []
                    for event in batch:
                        render(i, job, event, out)
                    if out:
                        yield b"".join(out)  # events that were ready together: one write
        yield b"data: [DONE]\n\n"
    except ServeError as e:
        yield sse(openai_error(e))
    finally:
        for job in jobs:
            servable.cancel(job)


@router.get("/v1/models", summary="OpenAI-compatible model list (generation models)", response_model=None,
            responses={200: {"model": ModelList, "description": "Ready generation models"}})
async def models(request: Request) -> dict[str, Any]:
    repository = request.app.state.repository
    data = []
    for m in repository.index()["models"]:
        if m.get("task") in ("char-lm", "seq2seq") and m.get("ready"):
            data.append({"id": m["name"], "object": "model", "created": 0, "owned_by": "deepserve"})
    return {"object": "list", "data": data}
