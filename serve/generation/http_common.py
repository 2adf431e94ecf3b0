"""HTTP helpers shared by the Triton generate routes and the OpenAI-compatible routes."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Coroutine

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from deepserve.serve.errors import BadRequest, NotFound, ServeError
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Event, Job, Result
from deepserve.serve.generation.schemas import CompletionRequest
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
    """Wait for the client to disconnect, then call ``on_gone``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


@asynccontextmanager
async def cancel_on_disconnect(request: Request, on_gone: Callable[[], None]) -> AsyncIterator[None]:
    """While the body runs, a client disconnect calls ``on_gone`` (the job's rows are freed next step)."""
    task = asyncio.create_task(_call_on_disconnect(request, on_gone))
    try:
        yield
    finally:
        task.cancel()


class ClientGone(ServeError):
    """The client closed the connection before its answer (nginx's 499): nobody reads that answer, but the
    request ends now, and counted, rather than when its deadline timer fires."""

    status = 499


def abandon(servable: GenerationServable, job: Job) -> None:
    """Its client hung up: free the job's rows at the next step and end its ``wait`` now (no-op once finished:
    the result is already queued ahead of the error)."""
    servable.cancel(job)
    job.events.put_nowait(Event("error", error=ClientGone("the client closed the connection")))


async def run_to_result(request: Request, servable: GenerationServable, job: Job) -> Result:
    """``servable.wait(job)``, a client disconnect cancelling the job: ``cancel_on_disconnect`` written out, which
    spares the event loop an async context manager per request."""
    watch = asyncio.create_task(_call_on_disconnect(request, lambda: abandon(servable, job)))
    try:
        return await servable.wait(job)
    finally:
        watch.cancel()


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ---- OpenAI's error shape for /v1 -------------------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
                 504: "timeout_error"}
_FIELDS = set(CompletionRequest.model_fields)


def openai_error(error: ServeError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``: what the openai SDK reads (``APIError.message``
    ends with ``error.message``; ``.type``, ``.param`` and ``.code`` come from the same object). ``param`` is
    the request field the message starts with, if any (our messages name the field first)."""
    first = error.message.split(" ", 1)[0].split("[", 1)[0]
    code = "model_not_found" if isinstance(error, NotFound) else "rate_limit_exceeded" if error.status == 429 else None
    return {"error": {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "server_error"),
                      "param": first if first in _FIELDS else None, "code": code}}


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
                return JSONResponse(openai_error(BadRequest("; ".join(problems) or "invalid request")),
                                    status_code=400)

        return openai_errors
