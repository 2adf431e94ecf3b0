"""HTTP helpers shared by the Triton generate routes and the OpenAI-compatible routes."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from deepserve.serve.errors import BadRequest, NotFound, ServeError
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Event, EventKind, Job, Result, TokenLogprobs
from deepserve.serve.generation.params import InvalidParameter
from deepserve.serve.http_util import read_body

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object body. Invalid UTF-8 is replaced (it then tokenizes as unknown) rather than refused."""
    raw = await read_body(request)  # the server's body limit and Content-Encoding apply here too
    try:
        body = json.loads(raw.decode("utf-8", errors="replace") or "null")
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def generation_servable(request: Request, model: str, version: str | None) -> GenerationServable:
    servable = request.app.state.repository.get(model, version)
    if not isinstance(servable, GenerationServable):
        raise BadRequest(f"model {model!r} is a {servable.manifest.task} model; text generation needs a char-lm "
                         f"or seq2seq model")
    return servable


async def _call_on_disconnect(request: Request, on_gone: Callable[[], None]) -> None:
    """Wait for the client to disconnect (other messages: the rest of a body nobody reads), then call ``on_gone``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    on_gone()


class ClientGone(ServeError):
    """The client closed the connection before its answer (nginx's 499): nobody reads that answer, but the
    request ends now, and counted, rather than when its deadline timer fires."""

    status = 499


def abandon(servable: GenerationServable, job: Job) -> None:
    """Its client hung up: free the job's rows at the next step and end its ``wait`` now (no-op once finished:
    the result is already queued ahead of the error)."""
    servable.cancel(job)
    job.events.put_nowait(Event(EventKind.ERROR, error=ClientGone("the client closed the connection")))


async def run_to_results(request: Request, servable: GenerationServable, jobs: list[Job]) -> list[Result]:
    """Each job's ``servable.wait``, one watcher cancelling every job if the client disconnects meanwhile."""
    watch = asyncio.create_task(_call_on_disconnect(request, lambda: [abandon(servable, j) for j in jobs]))
    try:
        return [await servable.wait(j) for j in jobs]
    finally:
        watch.cancel()


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


Piece = tuple[int, str, "str | None", "TokenLogprobs | None"]
"""What a stream sends for one output index: (index, new text, finish reason or None, new tokens' logprobs)."""


def pieces(job: Job, event: Event) -> Iterator[Piece]:
    """The pieces an event of ``job`` owes its stream: a delta's text (to every index, for the prefix all beams
    share), then with the result what each output still owes (beam search: every returned sequence)."""
    if event.kind == EventKind.DELTA:
        indices = range(job.params.num_return_sequences) if event.index < 0 else (event.index,)
        for i in indices:
            yield i, event.text, event.extra.get("finish_reason"), event.extra.get("logprobs")
    elif event.result is not None:
        for o in event.result.outputs:
            rest, lp = job.remaining_text(o.index, o.text), job.final_logprobs(o)
            if job.is_beam or rest or lp is not None:
                yield o.index, rest, o.finish_reason, lp


async def sse_stream(servable: GenerationServable, jobs: list[Job], encode: Callable[[int, Piece], bytes],
                     error: Callable[[ServeError], bytes], end: bytes = b"") -> AsyncIterator[bytes]:
    """The server-sent events of ``jobs`` (one after the other; all were queued at once), each piece rendered by
    ``encode(job number, piece)``: the Triton and OpenAI streams differ only in that and in ``error`` (the last
    event of a stream that fails) and ``end``. Events ready together go out as one write (a stream that fell
    behind catches up); leaving early (client gone) cancels every job."""
    try:
        for i, job in enumerate(jobs):
            async with aclosing(servable.event_batches(job)) as batches:
                async for batch in batches:
                    out = [encode(i, piece) for event in batch for piece in pieces(job, event)]
                    if out:
                        yield b"".join(out)
        if end:
            yield end
    except ServeError as e:
        yield error(e)
    finally:
        for job in jobs:
            servable.cancel(job)


# ---- OpenAI's error shape for /v1 -------------------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
                 504: "timeout_error"}


def openai_error(error: ServeError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``: what the openai SDK reads (``APIError.message``
    ends with ``error.message``; ``.type``, ``.param`` and ``.code`` come from the same object). ``param`` is
    the request field an ``InvalidParameter`` names."""
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
                return JSONResponse(openai_error(e), status_code=e.status, headers=e.headers)
            except RequestValidationError as e:
                problems = [f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', 'invalid')}"
                            for err in e.errors()]
                return JSONResponse(openai_error(BadRequest("; ".join(problems) or "invalid request")),
                                    status_code=400)

        return openai_errors
