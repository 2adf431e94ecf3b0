"""OpenAI-compatible completions: ``POST /v1/completions`` (plain and ``stream``) and ``GET /v1/models``.

Standard fields: model, prompt (a string or a list of strings), max_tokens (default 16), temperature
(default 1), top_p, n, stream, seed, stop, logprobs. Extensions (the SDK sends them through ``extra_body``):
top_k (-1 or 0 disables), use_beam_search, num_beams (defaults to n with use_beam_search, as in vLLM),
length_penalty, early_stopping, repetition_penalty, min_tokens, no_repeat_ngram_size. A seq2seq model takes
its source sentence as the prompt. Error messages name the OpenAI field (``max_tokens``, not
``max_new_tokens``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from deepserve.serve.errors import BadRequest, ServeError
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.http_common import (
    SSE_HEADERS, cancel_on_disconnect, generation_servable, read_json, sse,
)
from deepserve.serve.generation.jobs import Job, Output, Result
from deepserve.serve.generation.params import GenerationParams

router = APIRouter(tags=["openai"])

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


def _logprobs_json(o: Output, servable: GenerationServable) -> dict[str, Any] | None:
    if o.logprobs is None:
        return None
    tok = servable.tokenizer
    tokens = [tok.token_text(t) for t in o.token_ids[: len(o.logprobs)]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = [{tok.token_text(t): lp for t, lp in row} for row in (o.top_logprobs or [])] or None
    return {"tokens": tokens, "token_logprobs": o.logprobs, "top_logprobs": tops, "text_offset": offsets}


def _usage(results: list[Result]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/v1/completions", summary="OpenAI-compatible text completion")
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
    try:
        for p in prompts:
            jobs.append(servable.submit(p, params, stream=stream))
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
            servable.cancel(j)

    async with cancel_on_disconnect(request, cancel_all):
        results = [await servable.wait(j) for j in jobs]
    choices = [
        {"index": i * n + o.index, "text": o.text, "logprobs": _logprobs_json(o, servable),
         "finish_reason": o.finish_reason}
        for i, r in enumerate(results) for o in r.outputs
    ]
    return {**head, "choices": choices, "usage": _usage(results)}


async def _stream(servable: GenerationServable, jobs: list[Job], head: dict[str, Any], n: int) -> AsyncIterator[bytes]:
    def chunk(index: int, text: str, finish: str | None) -> bytes:
        return sse({**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]})

    try:
        for i, job in enumerate(jobs):  # several prompts: one after the other (all were queued at once)
            async for event in servable.events(job):
                if event.kind == "delta":
                    indices = range(n) if event.index < 0 else [event.index]
                    for k in indices:
                        yield chunk(i * n + k, event.text, event.extra.get("finish_reason"))
                elif event.result is not None:
                    for o in event.result.outputs:
                        rest = job.remaining_text(o.index, o.text)
                        if job.is_beam or rest:
                            yield chunk(i * n + o.index, rest, o.finish_reason)
        yield b"data: [DONE]\n\n"
    except ServeError as e:
        yield sse({"error": {"message": e.message, "type": type(e).__name__, "code": e.status}})
    finally:
        for job in jobs:
            servable.cancel(job)


@router.get("/v1/models", summary="OpenAI-compatible model list (generation models)")
async def models(request: Request) -> dict[str, Any]:
    repository = request.app.state.repository
    data = []
    for m in repository.index()["models"]:
        if m.get("task") in ("char-lm", "seq2seq") and m.get("ready"):
            data.append({"id": m["name"], "object": "model", "created": 0, "owned_by": "deepserve"})
    return {"object": "list", "data": data}
