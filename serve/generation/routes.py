"""Triton's generate extension over HTTP, plus the OpenAI-compatible routes (``openai_api.py``).

    POST /v2/models/{model}[/versions/{version}]/generate          -> one JSON answer
    POST /v2/models/{model}[/versions/{version}]/generate_stream   -> server-sent events

Body ``{"text_input": "...", "parameters": {...GenerationParams...}}``; answer ``{"model_name",
"model_version", "text_output", "finish_reason", "usage", ...}``. Client errors raise ``ServeError``s, which
the app turns into ``{"error": "..."}`` with the right status. The shapes are declared in ``schemas.py``
(OpenAPI only: bodies are parsed by hand, answers are plain dicts).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepserve.serve.errors import BadRequest, ServeError
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.http_common import (
    SSE_HEADERS, generation_servable, read_json, run_to_result, sse,
)
from deepserve.serve.generation.jobs import Event, Output, TokenLogprobs
from deepserve.serve.generation.openai_api import router as openai_router
from deepserve.serve.generation.params import GenerationParams
from deepserve.serve.generation.schemas import (
    GenerateRequest, GenerateResponse, GenerateStreamEvent, TritonError, json_body, responses,
)
from deepserve.serve.http_util import DirectRoute

router = APIRouter(tags=["generation"])
# The Triton routes are ``DirectRoute``s: no per-request dependency solving or response serialisation. The event
# loop's time per request is what caps continuous batching over HTTP (it also shares the GIL with the scheduler
# thread); with the one-event ``wait`` this took its CPU per /generate request from ~0.53 to ~0.34 ms.
triton_router = APIRouter(route_class=DirectRoute)  # tagged where ``router`` includes it
_GENERATE = dict(openapi_extra=json_body(GenerateRequest), responses=responses(GenerateResponse, TritonError),
                 response_model=None)
_STREAM = dict(openapi_extra=json_body(GenerateRequest),
               responses=responses(GenerateResponse, TritonError, stream=GenerateStreamEvent))


def logprobs_json(lp: TokenLogprobs, tokenizer: Any) -> dict[str, Any]:
    """A stream event's ``tokens`` / ``logprobs`` (/ ``top_logprobs``), the keys of a sequence's."""
    out: dict[str, Any] = {"tokens": [tokenizer.token_text(t) for t in lp.token_ids], "logprobs": lp.logprobs}
    if any(lp.top_logprobs):
        out["top_logprobs"] = [{tokenizer.token_text(t): v for t, v in tops} for tops in lp.top_logprobs]
    return out


def output_json(o: Output, tokenizer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"index": o.index, "text_output": o.text, "finish_reason": o.finish_reason,
                           "num_tokens": len(o.token_ids)}
    if o.score is not None:
        out["score"] = o.score
    if o.logprobs is not None:
        out["tokens"] = [tokenizer.token_text(t) for t in o.token_ids[: len(o.logprobs)]]
        out["logprobs"] = o.logprobs
        if o.top_logprobs and any(o.top_logprobs):
            out["top_logprobs"] = [{tokenizer.token_text(t): lp for t, lp in tops} for tops in o.top_logprobs]
    return out


def _triton_request(body: dict[str, Any]) -> tuple[str, GenerationParams]:
    unknown = sorted(set(body) - {"text_input", "parameters", "id"})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; the generate body has text_input and parameters")
    text = body.get("text_input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise BadRequest(f"text_input must be a string, got {text!r}")
    params = dict(body.get("parameters") or {}) if isinstance(body.get("parameters"), dict) else body.get("parameters")
    if isinstance(params, dict):
        params.pop("stream", None)  # Triton clients send it; the endpoint decides
    return text, GenerationParams.from_dict(params)


def _head(servable: GenerationServable) -> dict[str, Any]:
    return {"model_name": servable.manifest.name, "model_version": str(servable.manifest.version)}


async def _generate(request: Request, model: str, version: str | None) -> Response:
    body = await read_json(request)
    servable = generation_servable(request, model, version)
    text, params = _triton_request(body)
    job = servable.submit(text, params)
    result = await run_to_result(request, servable, job)
    best = result.outputs[0]
    answer = {**_head(servable), "text_output": best.text, "finish_reason": best.finish_reason,
              "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}}
    if "id" in body:
        answer["id"] = body["id"]
    if best.score is not None:
        answer["score"] = best.score
    if len(result.outputs) > 1 or params.logprobs is not None:
        answer["sequences"] = [output_json(o, servable.tokenizer) for o in result.outputs]
    return JSONResponse(answer)


async def _generate_stream(request: Request, model: str, version: str | None) -> StreamingResponse:
    body = await read_json(request)
    servable = generation_servable(request, model, version)
    text, params = _triton_request(body)
    job = servable.submit(text, params, stream=True)  # errors here are plain HTTP errors
    head = _head(servable)
    tok = servable.tokenizer

    def render(event: Event, out: list[bytes]) -> None:
        if event.kind == "delta":
            indices = range(params.num_return_sequences) if event.index < 0 else [event.index]
            lp = event.extra.get("logprobs")
            for i in indices:
                data = {**head, "index": i, "text_output": event.text,
                        "finish_reason": event.extra.get("finish_reason")}
                out.append(sse({**data, **logprobs_json(lp, tok)} if lp is not None else data))
        elif event.result is not None:
            for o in event.result.outputs:
                rest = job.remaining_text(o.index, o.text)
                lp = job.final_logprobs(o)
                if job.is_beam or rest or lp is not None:
                    data = {**head, "index": o.index, "text_output": rest, "finish_reason": o.finish_reason}
                    if o.score is not None:
                        data["score"] = o.score
                    out.append(sse({**data, **logprobs_json(lp, tok)} if lp is not None else data))

    async def events() -> AsyncIterator[bytes]:
        try:
            async with aclosing(servable.event_batches(job)) as batches:  # a client gone cancels the job now
                async for batch in batches:
                    out: list[bytes] = []
                    for event in batch:
                        render(event, out)
                    if out:
                        yield b"".join(out)  # events that were ready together: one write
        except ServeError as e:
            yield sse({"error": e.message, "status": e.status})

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@triton_router.post("/v2/models/{model}/generate", summary="Generate text (Triton generate extension)",
                    **_GENERATE)
async def generate(request: Request, model: str) -> Response:
    return await _generate(request, model, None)


@triton_router.post("/v2/models/{model}/versions/{version}/generate", summary="Generate text with a given version",
                    **_GENERATE)
async def generate_version(request: Request, model: str, version: str) -> Response:
    return await _generate(request, model, version)


@triton_router.post("/v2/models/{model}/generate_stream", summary="Generate text as server-sent events", **_STREAM)
async def generate_stream(request: Request, model: str) -> StreamingResponse:
    return await _generate_stream(request, model, None)


@triton_router.post("/v2/models/{model}/versions/{version}/generate_stream", summary="Stream a given version",
                    **_STREAM)
async def generate_stream_version(request: Request, model: str, version: str) -> StreamingResponse:
    return await _generate_stream(request, model, version)


router.include_router(triton_router)
HOT_ROUTES = triton_router.routes
"""Answered by the app's front door (``HotPath``), ahead of the middleware stack."""
router.include_router(openai_router)
