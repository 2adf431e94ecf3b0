"""Streams over a real socket at their ends: a shutdown while streams run lets each finish and the server exit;
clients hanging up mid-stream leave the other streams running to their end."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.test_generation_serving import live_app, repo  # noqa: F401 (fixture)


def _streams(url: str, n: int, hang_up: int, body: dict) -> tuple[list[threading.Thread], list, threading.Barrier]:
    """``n`` clients streaming ``body``; the first ``hang_up`` ask for 4000 tokens (``HANG_UP``) and close their
    connection after the first event. Each waits at the barrier (with the caller) once its first event is in; the
    others' events go to the list."""
    results: list = []
    started = threading.Barrier(n + 1)

    def stream(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            asked = body if i >= hang_up else HANG_UP
            with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=asked) as r:
                lines = r.iter_lines()
                first = next(lines)
                started.wait(30)
                if i >= hang_up:
                    results.append([json.loads(x[6:]) for x in (first, *lines) if x.startswith("data: ")])

    clients = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in clients:
        t.start()
    return clients, results, started


LONG = {"text_input": "a", "parameters": {"temperature": 0, "max_new_tokens": 300, "min_new_tokens": 300}}
HANG_UP = {"text_input": "a", "parameters": {"temperature": 0, "max_new_tokens": 4000, "min_new_tokens": 4000}}


def test_shutdown_with_streams_running_ends_them_in_full(repo):
    """Streams in flight when the server is told to exit: every one runs to its end, and the server exits."""
    with live_app(repo, max_new_tokens=4000) as live:
        scheduler = live.app.state.repository.get("tiny-charlm").scheduler
        clients, results, started = _streams(live.url, 4, 0, LONG)
        started.wait(30)
        assert scheduler.running  # told to exit while they run
        t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 20.0 and not scheduler.thread.is_alive()
    for t in clients:
        t.join(30)
    assert len(results) == 4 and all(events[-1]["finish_reason"] == "length" for events in results)


def test_clients_that_hang_up_mid_stream_leave_the_others_streaming(repo):
    with live_app(repo, max_new_tokens=4000) as live:
        scheduler = live.app.state.repository.get("tiny-charlm").scheduler
        steps_before = scheduler.steps
        clients, results, started = _streams(live.url, 4, 2, LONG)
        started.wait(30)
        for t in clients:
            t.join(30)
        assert scheduler.wait_rows(0, 20.0)
        assert scheduler.steps - steps_before < 3900  # the hung-up streams stopped long before their 4000 tokens
    assert len(results) == 2 and all(events[-1]["finish_reason"] == "length" for events in results)


def raising_after_disconnect(app: ASGIApp) -> ASGIApp:
    """``app`` as an ASGI 2.4 server calls it: once it has reported the client's disconnect, a send raises
    ``OSError`` (the spec allows that in place of doing nothing, which uvicorn does)."""

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        gone = False

        async def watched_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def raising_send(message: Message) -> None:
            if gone:
                raise OSError("the client closed the connection")
            await send(message)

        await app({**scope, "asgi": {"version": "3.0", "spec_version": "2.4"}}, watched_receive, raising_send)

    return call


def test_a_send_that_raises_after_a_hang_up_abandons_the_stream_quietly(repo, caplog):
    """The stream's send raising ``OSError`` after its client left is that client gone, as a disconnect is: its
    rows are freed, and nothing is logged as a server failure."""
    with caplog.at_level(logging.WARNING, logger="deepserve"):
        with live_app(repo, max_new_tokens=4000) as live:
            scheduler = live.app.state.repository.get("tiny-charlm").scheduler
            live.app.gate = raising_after_disconnect(live.app.gate)  # between the front door and the routes
            with httpx.Client(base_url=live.url, timeout=60) as c:
                with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=HANG_UP) as r:
                    next(line for line in r.iter_lines() if line.startswith("data: "))
            assert scheduler.wait_rows(0, 20.0)
    # the server has stopped: the stream's request has ended and logged whatever it logs
    failures = [r for r in caplog.records if r.name.startswith("deepserve") and r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]


def test_an_oserror_while_encoding_is_a_server_failure_not_a_client_gone(repo, caplog, monkeypatch):
    """Only a send's ``OSError`` means the client left: one raised while rendering an event is the server's own
    failure, so the stream is cut short (not ended as if complete) and the failure is logged."""
    from deepserve.serve.generation import routes

    def broken(data: object) -> bytes:
        raise OSError("the encoder failed")

    with caplog.at_level(logging.ERROR):
        with live_app(repo, max_new_tokens=4000) as live:
            monkeypatch.setattr(routes, "sse", broken)  # an event with a dict to render
            monkeypatch.setattr(routes, "dump_str", broken)  # a plain token's text
            with httpx.Client(base_url=live.url, timeout=60) as c:
                with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=LONG) as r:
                    assert r.status_code == 200
                    try:
                        list(r.iter_lines())
                        cut = False
                    except httpx.RemoteProtocolError:  # the body ended without its last chunk
                        cut = True
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], OSError)]
    assert cut and logged, [r.getMessage() for r in caplog.records]
