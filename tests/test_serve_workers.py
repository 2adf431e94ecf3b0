"""`deepserve serve --workers 2` on a real socket: both processes answer, /metrics sums them, model control answers
409, and SIGTERM drains every worker before the command exits 0."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from deepserve.serve.app import create_app
from deepserve.serve.workers import WORKERS_ENV
from tests.artifacts import make_classifier_artifact
from tests.live_server import running_server, scrape

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


def test_workers_stop_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL leaves the supervisor no time to stop its workers: they notice and stop themselves."""
    make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    with running_server(tmp_path / "repo", tmp_path, "--workers", str(WORKERS)) as s:
        pid = s["proc"].pid
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == WORKERS
        exited = [os.pidfd_open(w) for w in workers]  # readable once the process has exited
        s["proc"].kill()
        s["proc"].wait()
        deadline = time.monotonic() + 60
        try:
            for fd in exited:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, "a worker kept serving after its supervisor was killed"
        finally:
            for fd in exited:
                os.close(fd)


def test_sigterm_drains_every_worker_then_exits_0(server):
    """Runs last in this module: it stops the shared server."""
    url = f"{server['base']}/v2/models/tiny-cnn/infer"

    async def load_then_terminate() -> list:
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.ensure_future(c.post(url, json=_body(i))) for i in range(16)]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            server["proc"].send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    answered = 0
    for outcome in asyncio.run(load_then_terminate()):
        if isinstance(outcome, httpx.ConnectError):
            continue  # sent after the listeners closed: never accepted, which is allowed
        assert not isinstance(outcome, BaseException), repr(outcome)
        if outcome.status_code == 503:
            assert outcome.headers["connection"] == "close" and "error" in outcome.json()
            continue
        assert outcome.status_code == 200, outcome.text
        answered += 1
    assert answered >= 1
    server["proc"].wait(timeout=60)
    assert server["proc"].returncode == 0
    assert server["stderr"].read_text().count("Application shutdown complete") == WORKERS
