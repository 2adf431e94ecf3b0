"""The scheduler paces its steps to the event loops that stream its events: a step waits (boundedly) until the
loop has run the previous hand-over. What must not happen: a stopped or blocked loop stalling the batch, a
shutdown or a client gone hanging the scheduler."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
from deepserve.manifest import load_manifest
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Event, EventKind, deliver
from tests.test_generation_serving import live_app, repo, settings  # noqa: F401 (fixture)


def test_a_stream_hand_over_is_flagged_once_its_loop_has_run_it():
    loop = asyncio.new_event_loop()
    try:
        stream, plain = (SimpleNamespace(loop=loop, stream=s, events=asyncio.Queue()) for s in (True, False))
        assert deliver([(plain, Event(EventKind.DONE))]) == []  # nobody streams: nothing to pace to
        ran, = deliver([(stream, Event(EventKind.DELTA, text="a")), (plain, Event(EventKind.DONE))])
        assert not ran.is_set() and stream.events.empty()  # the loop has not run yet
        loop.run_until_complete(asyncio.sleep(0))
        assert ran.is_set() and stream.events.qsize() == 1 and plain.events.qsize() == 2
    finally:
        loop.close()
    assert deliver([(stream, Event(EventKind.DELTA, text="b"))]) == []  # a closed loop: nothing to wait for


def test_a_blocked_loop_slows_its_streams_but_does_not_stall_the_batch(repo):
    """The loop that streams is blocked (it waits on the scheduler itself): each step waits at most the pacing
    limit, so the request beside it, and the stream, still finish."""
    directory = repo / "tiny-charlm" / "1"

    async def main():
        s = GenerationServable(load_manifest(directory), directory, settings(), "cpu")
        await s.start()
        await s.warmup()
        try:
            params = {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": 40}
            streamed = s.submit("ab", params, stream=True)
            other = s.submit("ab", params)
            t0 = time.perf_counter()
            done = s.scheduler.wait_until(lambda: other.finished and streamed.finished, 20.0)  # blocks this loop
            blocked = time.perf_counter() - t0
            return done, blocked, await s.wait(other), await s.wait(streamed)
        finally:
            await s.stop()

    done, blocked, other, streamed = asyncio.run(main())
    assert done and blocked < 10.0
    assert other.completion_tokens == streamed.completion_tokens == 40


def _streams(url: str, n: int, hang_up: int, body: dict) -> tuple[list[threading.Thread], list, threading.Barrier]:
    """``n`` clients streaming ``body``; the first ``hang_up`` close their connection after the first event. Each
    waits at the barrier (with the caller) once its first event is in; the others' events go to the list."""
    results: list = []
    started = threading.Barrier(n + 1)

    def stream(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body) as r:
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


def test_shutdown_with_streams_running_ends_them_in_full(repo):
    """Streams in flight when the server is told to exit: every one runs to its end, and the server (its scheduler
    paced to a loop that is shutting down) exits."""
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
        clients, results, started = _streams(live.url, 4, 2, LONG)
        started.wait(30)
        for t in clients:
            t.join(30)
        assert scheduler.wait_rows(0, 20.0)
    assert len(results) == 2 and all(events[-1]["finish_reason"] == "length" for events in results)
