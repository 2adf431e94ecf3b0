"""HTTP helpers shared by the Triton generate routes and the OpenAI-compatible routes."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from deepserve.serve.errors import BadRequest
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Job, Result

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object body. Invalid UTF-8 is replaced (it then tokenizes as unknown) rather than refused."""
    raw = await request.body()
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


@asynccontextmanager
async def cancel_on_disconnect(request: Request, on_gone: Callable[[], None]) -> AsyncIterator[None]:
    """While the body runs, a client disconnect calls ``on_gone`` (the job's rows are freed next step)."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                on_gone()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


async def run_to_result(request: Request, servable: GenerationServable, job: Job) -> Result:
    async with cancel_on_disconnect(request, lambda: servable.cancel(job)):
        return await servable.wait(job)


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
