"""Carry one HTTP request between the Ray Serve ingress and a model replica, as plain picklable values.

The ingress sends the request's scope (without its per-process objects) and body; the replica runs it through
deepserve's own ASGI app (``create_app``: the same routes, codecs, errors, batchers and generation engine as
``deepserve serve``) and answers with the ASGI messages that app sent. Unary requests come back as one
``(start message, body)`` pair; streams as the messages themselves, through Ray's handle streaming.

A client that hangs up cancels the ingress's call, which Ray propagates to the replica: the app's task is
cancelled and its receive channel reports ``http.disconnect``, so generation is cancelled as in one process.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope

from deepserve.serve.http_util import dump_json

REPLICA_HEADER = b"x-deepserve-replica"
"""Names the replica that answered (the ingress passes it on): where a request went, for operators and tests."""
_PLAIN_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
               "server", "client")
_DROPPED_HEADERS = {b"content-length", b"content-encoding", b"authorization"}
"""The body is already read and decoded; the ingress checked the key (replicas need not see it)."""


def portable_scope(scope: Scope, body_length: int, request_id: str | None = None) -> dict[str, Any]:
    """The scope's plain values, for a body that is already read (and decompressed): the headers describe it,
    and carry the ingress's ``request_id`` (so the replica's log lines name the id the client got)."""
    out = {k: scope[k] for k in _PLAIN_KEYS if k in scope}
    dropped = _DROPPED_HEADERS | ({b"x-request-id"} if request_id else set())
    out["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in dropped]
    out["headers"].append((b"content-length", str(body_length).encode()))
    if request_id:
        out["headers"].append((b"x-request-id", request_id.encode()))
    return out


def replay(body: bytes, gone: asyncio.Event | None = None) -> Callable[[], Awaitable[Message]]:
    """An ASGI receive that gives ``body`` once, then reports a disconnect when ``gone`` is set (never, without)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    return receive


def _app_scope(scope: dict[str, Any]) -> dict[str, Any]:
    # ASGI spec 2.3: streamed answers then listen on receive for the disconnect, which ``gone`` sends
    return {**scope, "headers": list(scope["headers"]), "asgi": {"version": "3.0", "spec_version": "2.3"}}


def _tag(message: Message, replica: str) -> Message:
    if message["type"] == "http.response.start":
        message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, replica.encode())]}
    return message


def internal_error(error: BaseException) -> tuple[Message, bytes]:
    """What a replica answers when the app itself raised (``deepserve serve`` logs it and answers 500)."""
    body = dump_json({"error": f"internal error: {type(error).__name__}: {error}"})
    return ({"type": "http.response.start", "status": 500,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
            body)


async def run_unary(app: ASGIApp, scope: dict[str, Any], body: bytes, replica: str) -> tuple[Message, bytes]:
    """Run one request through ``app``; its response's start message and whole body."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = _tag(message, replica)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(_app_scope(scope), replay(body), send)
    except Exception as e:  # the app's own failure: a 500 naming it, as the plain server gives
        if start is None:
            return internal_error(e)
    if start is None:
        return internal_error(RuntimeError("the app sent no response"))
    return start, b"".join(chunks)


async def run_stream(app: ASGIApp, scope: dict[str, Any], body: bytes, replica: str) -> AsyncIterator[Message]:
    """Run one request through ``app``, yielding its ASGI messages as it sends them. Closing this generator
    early (the client left) tells the app the client is gone and cancels it."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    task = asyncio.create_task(app(_app_scope(scope), replay(body, gone), queue.put))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    started = False
    try:
        while (message := await queue.get()) is not None:
            started = started or message["type"] == "http.response.start"
            yield _tag(message, replica)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
        error = task.exception() if not task.cancelled() else None
        if not started:
            start, payload = internal_error(error or RuntimeError("the app sent no response"))
            yield _tag(start, replica)
            yield {"type": "http.response.body", "body": payload, "more_body": False}
    finally:
        gone.set()  # the app's disconnect watchers see the client leave ...
        if not task.done():
            task.cancel()  # ... and whatever still waits is cancelled, its generation with it


def receive_body_then(receive: Receive, body: bytes) -> Receive:
    """``receive`` for an app that must read ``body`` again (already read from ``receive``)."""
    first = replay(body)
    used = False

    async def again() -> Message:
        nonlocal used
        if not used:
            used = True
            return await first()
        return await receive()

    return again
