"""Generation over HTTP: Triton's generate extension, and what every generation route shares (the OpenAI-compatible
routes in ``openai_api.py`` differ only in their encoder and error shape).

    POST /v2/models/{model}[/versions/{version}]/generate          -> one JSON answer
    POST /v2/models/{model}[/versions/{version}]/generate_stream   -> server-sent events

Body ``{"text_input", "parameters"}``; answer ``{"model_name", "model_version", "text_output", "finish_reason",
"usage", ...}``; client errors raise ``ServeError``s. ``schemas.py`` declares the shapes for OpenAPI only.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing, asynccontextmanager
from json import dumps
from json.encoder import encode_basestring as dump_str  # json.dumps(s, ensure_ascii=False) of a str
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from deepserve.serve.errors import BadRequest, ServeError
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Event, EventKind, Job, Output, Result, TokenLogprobs
from deepserve.serve.generation.params import GenerationParams, InvalidParameter, check
from deepserve.serve.generation.schemas import (
    GenerateResponse, GenerateStreamEvent, TritonError, generate_request_schema, request_body, responses)
from deepserve.serve.http_util import (
    DirectRoute, deadline_from, json_depth_limit, parse_json, read_body, require_json)

async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object body. Invalid UTF-8 is replaced (it then tokenizes as unknown) rather than refused."""
    require_json(request)
    raw = await read_body(request)  # the server's body limit and Content-Encoding apply here too
    if not raw.isascii():  # one C scan for the usual body; only others are decoded (invalid UTF-8 replaced)
        raw = raw.decode("utf-8", errors="replace").encode()
    body = parse_json(raw or b"null", json_depth_limit(request))  # the server's one depth-limited parser
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def generation_servable(request: Request, model: str, version: str | None) -> GenerationServable:
    servable = request.app.state.repository.get(model, version)
    if not isinstance(servable, GenerationServable):
        raise BadRequest(f"model {model!r} is a {servable.manifest.task} model; text generation needs a char-lm "
                         f"or seq2seq model")
    return servable


@asynccontextmanager
async def abandoned_if_gone(receive: Receive, servable: GenerationServable, jobs: list[Job]) -> AsyncIterator[None]:
    """While inside: one plain task abandons every job if the client disconnects."""
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the rest of a body nobody reads
        abandon(servable, jobs)

    watching = asyncio.create_task(watch())
    try:
        yield
    finally:
        watching.cancel()


class ClientGone(ServeError):
    """The client closed the connection before its answer (nginx's 499): nobody reads that answer, but the
    request ends now, and counted, rather than when its deadline timer fires."""

    status = 499


def abandon(servable: GenerationServable, jobs: list[Job]) -> None:
    """Their client hung up: free the jobs' rows at the next step and end their ``wait`` now (no-op for one
    finished: its result is already queued ahead of the error)."""
    for job in jobs:
        servable.cancel(job)
        job.events.put_nowait(Event(EventKind.ERROR, error=ClientGone("the client closed the connection")))


async def run_to_results(request: Request, servable: GenerationServable, jobs: list[Job]) -> list[Result]:
    """Each job's ``servable.wait``, one watcher cancelling every job if the client disconnects meanwhile."""
    async with abandoned_if_gone(request.receive, servable, jobs):
        return [await servable.wait(j) for j in jobs]


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


Piece = tuple[int, str, "str | None", "TokenLogprobs | None", "float | None"]
"""What a stream sends for one output index: (index, new text, finish reason or None, new tokens' logprobs, beam
score in a sequence's final piece)."""


def pieces(job: Job, event: Event) -> Iterator[Piece]:
    """The pieces an event of ``job`` owes its stream: a delta's text (to every index, for the prefix all beams
    share), then with the result what each output still owes (beam search: every returned sequence)."""
    if event.kind == EventKind.DELTA:
        indices = range(job.params.num_return_sequences) if event.index < 0 else (event.index,)
        for i in indices:
            yield i, event.text, event.extra.get("finish_reason"), event.extra.get("logprobs"), None
    elif event.result is not None:
        for o in event.result.outputs:
            rest, lp = job.remaining_text(o.index, o.text), job.final_logprobs(o)
            if job.is_beam or rest or lp is not None:
                yield o.index, rest, o.finish_reason, lp, o.score


SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
               (b"content-type", b"text/event-stream; charset=utf-8"))  # as a StreamingResponse made them per stream


class EventStream(Response):
    """The server-sent events of ``jobs`` (one after the other), each piece rendered by ``encode(job number, piece)``;
    Triton and OpenAI differ only in that, ``error`` and ``end``. Leaving early cancels every job, as does a client
    gone, seen by one plain task or by a send's ``OSError``. It sends its ASGI messages itself (a ``StreamingResponse``
    cost a header build per stream and an async generator hop per event, on the loop delivering every stream)."""

    def __init__(self, servable: GenerationServable, jobs: list[Job], encode: Callable[[int, Piece], bytes],
                 error: Callable[[ServeError], bytes], end: bytes = b"") -> None:
        self.servable, self.jobs, self.encode, self.error, self.end = servable, jobs, encode, error, end
        self.status_code, self.background, self.raw_headers = 200, None, list(SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_unless_gone(message: Message) -> None:
            try:
                await send(message)
            except OSError:  # ASGI 2.4: a send after the client left may raise this; it is that client gone (only
                abandon(self.servable, self.jobs)  # here: an encoder's OSError is the server's failure)
        try:
            async with abandoned_if_gone(receive, self.servable, self.jobs):
                await send_unless_gone({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                await send_unless_gone({"type": "http.response.body", "body": await self.events(send_unless_gone),
                                        "more_body": False})
        finally:  # also a task cancelled mid-send: its jobs end now
            for job in self.jobs:
                self.servable.cancel(job)

    async def events(self, send: Send) -> bytes:  # each ready batch's pieces in one message; then the stream's end
        try:
            for i, job in enumerate(self.jobs):
                async with aclosing(self.servable.event_batches(job)) as batches:
                    async for batch in batches:
                        out = [self.encode(i, piece) for event in batch for piece in pieces(job, event)]
                        if out:
                            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        except ServeError as e:
            return self.error(e)
        return self.end


# ---- Triton's generate extension ---------------------------------------------------------------------------

router = APIRouter(tags=["generation"])
# The Triton routes are ``DirectRoute``s: no per-request dependency solving or response serialisation. The event
# loop's time per request is what caps continuous batching over HTTP (it also shares the GIL with the scheduler
# thread); with the one-event ``wait`` this took its CPU per /generate request from ~0.53 to ~0.34 ms.
triton_router = APIRouter(route_class=DirectRoute)  # tagged where ``router`` includes it
_GENERATE = dict(openapi_extra=request_body(generate_request_schema()),
                 responses=responses(GenerateResponse, TritonError), response_model=None)
_STREAM = dict(openapi_extra=request_body(generate_request_schema()),
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
    lp = o.token_logprobs()
    return out if lp is None else {**out, **logprobs_json(lp, tokenizer)}


def _triton_request(body: dict[str, Any]) -> tuple[str, GenerationParams]:
    unknown = sorted(set(body) - {"text_input", "parameters", "id"})
    if unknown:
        raise InvalidParameter.of(unknown[0], f"is not a field of the generate body (unknown: {unknown}; known: "
                                              "text_input, parameters, id)", body[unknown[0]])
    ident = body.get("id")  # echoed back: the schema says string (or null)
    check(ident is None or isinstance(ident, str), "id", "must be a string", ident)
    text = body.get("text_input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    check(isinstance(text, str), "text_input", "must be a string", text)
    params = dict(body.get("parameters") or {}) if isinstance(body.get("parameters"), dict) else body.get("parameters")
    if isinstance(params, dict):
        stream = params.pop("stream", None)  # Triton clients send it; the endpoint decides
        check(stream is None or isinstance(stream, bool), "parameters.stream", "must be true or false", stream)
    return text, GenerationParams.from_dict(params)


def _head(servable: GenerationServable) -> dict[str, Any]:
    return {"model_name": servable.manifest.name, "model_version": str(servable.manifest.version)}


async def _generate(request: Request, model: str, version: str | None) -> Response:
    servable = generation_servable(request, model, version)
    servable.check_admission()  # shed before reading and parsing the body
    body = await read_json(request)
    text, params = _triton_request(body)
    job = servable.submit(text, params, deadline=deadline_from(request))
    result, = await run_to_results(request, servable, [job])
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


async def _generate_stream(request: Request, model: str, version: str | None) -> EventStream:
    servable = generation_servable(request, model, version)
    servable.check_admission()  # shed before reading and parsing the body
    body = await read_json(request)
    text, params = _triton_request(body)
    job = servable.submit(text, params, stream=True, deadline=deadline_from(request))  # errors: plain HTTP ones
    head, tok = _head(servable), servable.tokenizer
    start = f"data: {json.dumps(head, ensure_ascii=False)[:-1]}, \"index\": "  # sse()'s bytes, its head made once

    def encode(_: int, piece: Piece) -> bytes:
        index, text, finish, lp, score = piece
        if lp is None and score is None:  # every token of a plain stream: no dict, one string escaped
            return f'{start}{index}, "text_output": {dump_str(text)}, "finish_reason": {dumps(finish)}}}\n\n'.encode()
        data = {**head, "index": index, "text_output": text, "finish_reason": finish}
        if score is not None:  # beam search, in each sequence's final event
            data["score"] = score
        return sse({**data, **logprobs_json(lp, tok)} if lp is not None else data)

    return EventStream(servable, [job], encode, lambda e: sse({"error": e.message, "status": e.status}))


@triton_router.post("/v2/models/{model}/generate", summary="Generate text (Triton generate extension)", **_GENERATE)
async def generate(request: Request, model: str) -> Response:
    return await _generate(request, model, None)


@triton_router.post("/v2/models/{model}/versions/{version}/generate", summary="Generate text with a given version",
                    **_GENERATE)
async def generate_version(request: Request, model: str, version: str) -> Response:
    return await _generate(request, model, version)


@triton_router.post("/v2/models/{model}/generate_stream", summary="Generate text as server-sent events", **_STREAM)
async def generate_stream(request: Request, model: str) -> EventStream:
    return await _generate_stream(request, model, None)


@triton_router.post("/v2/models/{model}/versions/{version}/generate_stream", summary="Stream a given version",
                    **_STREAM)
async def generate_stream_version(request: Request, model: str, version: str) -> EventStream:
    return await _generate_stream(request, model, version)


router.include_router(triton_router)
HOT_ROUTES = triton_router.routes  # Answered by the app's front door (``HotPath``), ahead of the middleware stack.
