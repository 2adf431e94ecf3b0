"""`deepserve serve --workers 2` on a real socket: both processes answer, /metrics sums them, model control answers
409, and SIGTERM drains every worker before the command exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from deepserve.serve.app import create_app
from deepserve.serve.workers import WORKERS_ENV
from tests.artifacts import make_classifier_artifact
from tests.live_server import running_server, scrape
from tests.servers import read_all

WORKERS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    with running_server(root, tmp_path_factory.mktemp("workers-log"), "--workers", str(WORKERS)) as s:
        yield s


def _body(seed: int) -> dict:
    x = np.random.default_rng(seed).standard_normal((1, 1, 8, 8)).astype(np.float32)
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}]}


async def _burst(url: str, n: int) -> list[httpx.Response]:
    """``n`` concurrent requests, each on its own connection (so the kernel spreads them over the workers)."""
    async def one(seed: int) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(url, json=_body(seed))

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_both_workers_answer_and_metrics_sum_them(server):
    url = f"{server['base']}/v2/models/tiny-cnn/infer"
    assert scrape(server["base"], "deepserve_workers_ready") == WORKERS
    prefixes, sent = set(), 0
    for _ in range(10):  # until both processes have answered (request ids carry a per-process prefix)
        answers = asyncio.run(_burst(url, 32))
        sent += len(answers)
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        prefixes |= {r.headers["x-request-id"][:12] for r in answers}
        if len(prefixes) == WORKERS:
            break
    assert len(prefixes) == WORKERS
    # whichever worker answers the scrape, it counts every worker's requests
    for _ in range(4):
        text = httpx.get(f"{server['base']}/metrics", timeout=10).text
        assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('deepserve_requests_total{endpoint="infer"')) == sent
    # each worker's queue depth as of its last batch, summed: nothing waits once every answer is in
    assert 'deepserve_queue_depth{model="tiny-cnn",version="1"} 0.0' in text


def test_model_control_answers_409_naming_workers(server):
    for action in ("load", "unload"):
        r = httpx.post(f"{server['base']}/v2/repository/models/tiny-cnn/{action}", timeout=10)
        assert r.status_code == 409 and "--workers" in r.json()["error"]
    ready = httpx.get(f"{server['base']}/v2/models/tiny-cnn/ready", timeout=10)
    assert ready.status_code == 200  # nothing was unloaded


@pytest.mark.anyio
async def test_ready_only_once_every_worker_is(tmp_path, monkeypatch):
    """One worker of two has loaded its models (the other's gauge is missing): not ready, saying how many are."""
    make_classifier_artifact(tmp_path, "tiny-cnn", quantize=False)
    app = create_app(tmp_path, device="cpu")
    repository = app.state.repository
    await repository.start()
    repository.metrics.set_serving(True)  # what the lifespan does once the models are loaded
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            monkeypatch.setenv(WORKERS_ENV, "2")
            r = await c.get("/v2/health/ready")
            assert r.status_code == 503 and "1 of 2 worker processes" in r.json()["error"]
            monkeypatch.setenv(WORKERS_ENV, "1")
            assert (await c.get("/v2/health/ready")).json() == {"ready": True}
    finally:
        await repository.stop()


def _workers(supervisor: int) -> list[int]:
    """The worker processes under ``supervisor`` (uvicorn spawns them: ``spawn_main`` on their command line)."""
    children = [int(c) for c in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _wait_exits(pids: list[int], what: str) -> None:
    """Until every one of ``pids`` has exited (bounded: 60 s on a busy machine)."""
    exited = [os.pidfd_open(p) for p in pids]  # readable once the process has exited
    deadline = time.monotonic() + 60
    try:
        for fd in exited:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, what
    finally:
        for fd in exited:
            os.close(fd)


def _wait_log(path: Path, text: str, count: int) -> None:
    """Until ``text`` is in the log ``count`` times (bounded: about 60 s on a busy machine)."""
    for _ in range(600):
        if path.read_text().count(text) >= count:
            return
        time.sleep(0.1)
    pytest.fail(f"{text!r} not logged {count} times:\n{path.read_text()[-3000:]}")


def test_workers_stop_when_the_supervisor_is_killed_and_the_next_run_clears_its_metrics(tmp_path):
    """SIGKILL leaves the supervisor no time to stop its workers or remove its metrics folder: the workers notice
    and stop themselves, and the next run removes the folder (under ``PROMETHEUS_MULTIPROC_DIR`` when set)."""
    make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    base = tmp_path / "metrics"
    base.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(base)}
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS), env=env) as s:
        workers = _workers(s["proc"].pid)
        assert len(workers) == WORKERS
        (stale,) = base.iterdir()
        s["proc"].kill()
        s["proc"].wait()
        _wait_exits(workers, "a worker kept serving after its supervisor was killed")
    assert stale.exists()
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS), env=env) as s:
        (current,) = base.iterdir()
        assert current != stale
        s["proc"].send_signal(signal.SIGTERM)
        assert s["proc"].wait(timeout=60) == 0
    assert list(base.iterdir()) == []


def test_workers_run_the_loop_the_command_names(tmp_path):
    """``--loop asyncio`` reaches every worker: none of them loads uvloop (which ``auto`` would pick)."""
    make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS), "--loop", "asyncio") as s:
        workers = _workers(s["proc"].pid)
        assert len(workers) == WORKERS
        for pid in workers:
            assert "uvloop" not in Path(f"/proc/{pid}/maps").read_text(), f"worker {pid} runs uvloop"
        assert httpx.post(f"{s['base']}/v2/models/tiny-cnn/infer", json=_body(0), timeout=10).status_code == 200


def test_a_crashed_worker_counts_no_more(tmp_path):
    """A worker killed outright cannot take its ready gauge away: the supervisor does, so readiness and /metrics
    count live workers only (its replacement counts once it has loaded)."""
    make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS)) as s:
        crashed = _workers(s["proc"].pid)[0]
        os.kill(crashed, signal.SIGKILL)
        _wait_log(s["stderr"], f"Child process [{crashed}] died", 1)
        _wait_log(s["stderr"], "Application startup complete", WORKERS + 1)  # the replacement
        assert scrape(s["base"], "deepserve_workers_ready") == WORKERS
        assert httpx.get(f"{s['base']}/v2/health/ready", timeout=10).status_code == 200


def test_sigterm_resets_no_connection_queued_after_the_workers_stop_accepting(tmp_path):
    """One worker still finishing a request after SIGTERM: a connection made once every worker has closed its
    listener must be refused (or answered), not queued and reset when the supervisor exits."""
    make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS)) as s:
        workers = _workers(s["proc"].pid)
        body = json.dumps(_body(0)).encode()
        slow = socket.create_connection(("127.0.0.1", s["port"]), timeout=30)
        slow.sendall(b"POST /v2/models/tiny-cnn/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"expect: 100-continue\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert slow.recv(64).startswith(b"HTTP/1.1 100")  # the app waits for this request's body: in flight
        s["proc"].send_signal(signal.SIGTERM)
        exits = [os.pidfd_open(w) for w in workers]  # readable once the process has exited
        try:  # the idle worker exits, the busy one drains
            assert len(select.select(exits, [], [], 60)[0]) == 1
        finally:
            for fd in exits:
                os.close(fd)
        late = None
        try:
            late = socket.create_connection(("127.0.0.1", s["port"]), timeout=30)
            late.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        except ConnectionRefusedError:
            pass  # never accepted: allowed
        slow.sendall(body)
        assert b" 200 " in slow.recv(65536).split(b"\r\n", 1)[0]
        assert s["proc"].wait(timeout=60) == 0
        if late is not None:
            answer = late.recv(65536)  # a reset raises ConnectionResetError here
            assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower(), answer


CLIENTS = 32
OPEN = 2
"""Connections a load client keeps awaiting their answers: it connects again as soon as its request is sent."""


def _infer_request() -> bytes:
    """One inference request on a connection the server closes after answering."""
    body = json.dumps(_body(0)).encode()
    return (b"POST /v2/models/tiny-cnn/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _assert_drained(answer: bytes) -> None:
    assert answer.startswith(b"HTTP/1.1 503") and b"\r\nconnection: close\r\n" in answer.lower(), answer[:300]
    assert b'"error"' in answer, answer[:300]


def _wait_status(pids: list[int], holds: Callable[[dict[str, str]], bool], what: str) -> None:
    """Until ``holds`` is true of the /proc status (field -> value) of every one of ``pids`` (bounded: about
    30 s on a busy machine)."""
    def status(pid: int) -> dict[str, str]:
        return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())

    for _ in range(300):
        if all(holds(status(p)) for p in pids):
            return
        time.sleep(0.1)
    pytest.fail(f"{pids}: not {what}")


def _stopped(status: dict[str, str]) -> bool:
    return status["State"].split()[0] == "T"


def _sigterm_pending(status: dict[str, str]) -> bool:
    return any(int(status[mask], 16) >> (signal.SIGTERM - 1) & 1 for mask in ("SigPnd", "ShdPnd"))


def test_sigterm_answers_what_waits_in_the_accept_queue_503_not_a_reset(tmp_path):
    """Connections the kernel completed on the shared socket but no worker had accepted when SIGTERM reached the
    workers are answered 503 + Connection: close as the last worker stops accepting, not reset when it closes the
    socket. The workers are stopped (SIGSTOP) while they are sent SIGTERM and 32 clients connect; their supervisor
    is killed first (its copy of the socket closed, as on SIGTERM, and no health check of a stopped worker)."""
    make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    (tmp_path / "metrics").mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}  # the killed supervisor leaves its folder there
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS), env=env) as s:
        workers = _workers(s["proc"].pid)
        clients = []
        try:
            for worker in workers:
                os.kill(worker, signal.SIGSTOP)
            s["proc"].kill()
            s["proc"].wait()
            _wait_status(workers, _stopped, "stopped")
            for worker in workers:
                os.kill(worker, signal.SIGTERM)
            _wait_status(workers, _sigterm_pending, "sent SIGTERM")
            clients = [socket.create_connection(("127.0.0.1", s["port"]), timeout=30) for _ in range(CLIENTS)]
            for c in clients:
                c.sendall(_infer_request())
            time.sleep(0.2)  # stopped longer than uvicorn's 0.1 s tick, as a worker short of CPU may be
        finally:
            for worker in workers:
                os.kill(worker, signal.SIGCONT)
        for c in clients:
            with c:
                _assert_drained(read_all(c))  # a reset raises ConnectionResetError here
        _wait_exits(workers, "a worker did not stop after SIGTERM")


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: list) -> None:
    """The whole answer on a connection (until the server closes it: b"" if it closed without answering), or the
    error that ended it (a reset)."""
    try:
        answers.append(await reader.read())
    except OSError as e:
        answers.append(e)
    finally:
        writer.close()


async def _connect_until_refused(port: int, answers: list, first: asyncio.Event) -> None:
    """New connections, each sending an inference request, until the server refuses one (its listeners closed:
    never accepted, which is allowed); the next connects as soon as the request is sent, with up to ``OPEN``
    awaiting their answers. A reset seen as a connection completes is kept too (the kernel had queued it)."""
    answering: list[asyncio.Future] = []
    for _ in range(500):  # bounded: the server stops within seconds of SIGTERM
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            break
        except OSError as e:
            answers.append(e)
            break
        writer.write(_infer_request())
        answering.append(asyncio.ensure_future(_answer(reader, writer, answers)))
        if len(answering) == OPEN:
            await answering.pop(0)
        first.set()
    await asyncio.gather(*answering)


def test_sigterm_drains_every_worker_then_exits_0(server):
    """Under load from 32 clients making new connections, no accepted connection is lost: each is answered (200,
    or 503 + Connection: close once draining) or refused before it is accepted; none is reset, including those
    still waiting in the shared socket's accept queue when the last worker stops. Runs last in this module: it
    stops the shared server."""
    async def load_then_terminate() -> list:
        answers: list = []
        first = asyncio.Event()
        clients = [asyncio.ensure_future(_connect_until_refused(server["port"], answers, first))
                   for _ in range(CLIENTS)]
        await first.wait()
        server["proc"].send_signal(signal.SIGTERM)
        await asyncio.gather(*clients)
        return answers

    answers = asyncio.run(load_then_terminate())
    lost = [a for a in answers if isinstance(a, OSError) or not a.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503"))]
    assert not lost, f"{len(lost)} of {len(answers)} accepted connections not answered: {lost[:5]}"
    drained = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    for answer in drained:
        _assert_drained(answer)
    assert len(answers) > len(drained)  # some answered 200 before the signal
    assert server["proc"].wait(timeout=60) == 0
    assert server["stderr"].read_text().count("Application shutdown complete") == WORKERS
