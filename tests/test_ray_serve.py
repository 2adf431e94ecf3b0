"""The Ray Serve application on a real local Ray (127.0.0.1, 2 CPUs, no dashboard), started once for the module
the way users start it (``deepserve serve --engine ray`` with API keys, ``--metrics-auth``, CORS and explicit
model control), with 2 replicas of the classifier and of the char-LM and an autoscaling seq2seq model.

It must answer exactly as the plain server does (the same requests against ``deepserve serve``'s app in process,
with the same flags, give the same bodies), check keys and CORS as it does, deploy and delete a model's
application on load and unload (racing loads and unloads end as Ray serves; a model whose replicas cannot start
answers 400 naming why; a redeploy whose rollback fails too unloads it; a restarted ingress adopts the
applications Ray runs), show every replica's batch and generation series in ``/metrics``, spread requests over the
replicas, scale out under load and back, survive the loss of a replica under load (every request answered 200 or a
clear 503, none hanging; Ray brings the replica back), and a client that hangs up must stop its generation inside
the replica."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact
from tests.servers import free_port
from tests.test_serve_socket import body, images

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, dict[str, Any]] = {
    "tiny-cnn": {"num_replicas": 2}, "tiny-charlm": {"num_replicas": 2},
    "tiny-seq2seq": {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                     "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 1}},
    "spare-cnn": {"num_replicas": 1},
}
"""Each model's ray section (Ray rejects a malformed autoscaling config when the app deploys). ``spare-cnn`` is
not loaded at start (``--model-control explicit``): a test loads and unloads it."""
STARTED = ("tiny-cnn", "tiny-charlm", "tiny-seq2seq")
API_KEY, ADMIN_KEY = "ray-api-key", "ray-admin-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ORIGIN = "http://playground.example"
FLAGS = ["--api-key", API_KEY, "--admin-api-key", ADMIN_KEY, "--metrics-auth", "--cors-allow-origin", ORIGIN,
         "--model-control", "explicit", *(f for m in STARTED for f in ("--load-model", m))]
"""The server's flags: keys on every route (metrics too), CORS for one origin, three of the four models loaded."""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_classifier_artifact(root, "spare-cnn", quantize=False)
    make_charlm_artifact(root, "tiny-charlm", quantize=False)
    make_seq2seq_artifact(root, "tiny-seq2seq", quantize=False)
    for name, ray_section in MODELS.items():
        config = {"max_new_tokens": 1_000_000, "ray": {**ray_section, "num_cpus": 0.25}}
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def ray_env() -> dict[str, str]:
    """One cluster's token (not the machine-wide ~/.ray one), loopback addresses, no usage reporting."""
    from deepserve.serve.ray_app import local_ray_env

    return {**local_ray_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0"}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.2)  # test only: the condition is in other processes


@pytest.fixture(scope="module")
def cluster(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port = free_port()
    env = ray_env()
    out = tmp_path_factory.mktemp("ray-log") / "stdout.txt"
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--engine", "ray", "--repository", str(repository),
           "--port", str(port), "--device", "cpu", "--log-level", "warning", *FLAGS]
    with open(out, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    from deepserve.serve.ray_app import THROUGHPUT_ENV

    # this process joins the cluster as a driver (to kill replicas, read their metrics), with handles of Serve's
    # default kind (a throughput-optimised handle needs a running event loop)
    driver = {k: v for k, v in env.items() if k not in THROUGHPUT_ENV}
    saved = {k: os.environ.get(k) for k in driver}
    os.environ.update(driver)
    import ray

    try:
        wait_for(lambda: proc.poll() is not None or "serving" in out.read_text(), 150, "Ray Serve app deployed")
        text = out.read_text()
        if proc.poll() is not None:
            pytest.fail(f"deepserve serve --engine ray exited with {proc.returncode}:\n{text[-3000:]}")
        address = re.search(r"Ray at ([\d.]+:\d+)", text).group(1)
        assert address.startswith("127.0.0.1:")  # a local Ray on the loopback
        ray.init(address=address, log_to_driver=False)
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "proc": proc, "log": out}
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # serve.shutdown: replicas drain, Ray stops
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def plain(repository: Path) -> Iterator[Any]:
    """``deepserve serve``'s own app, in process, over the same repository: the reference answers."""
    from starlette.testclient import TestClient

    from deepserve.cli import build_parser
    from deepserve.serve.app import create_app
    from deepserve.serve.cli import access_policy
    from deepserve.serve.repository import ModelRepository

    args = build_parser("serve").parse_args(["serve", "--repository", str(repository), *FLAGS])
    repo = ModelRepository(repository, device="cpu", model_control="explicit", load_models=STARTED)
    app = create_app(repo, access=access_policy(args), cors_allow_origins=[ORIGIN])
    with TestClient(app, client=("127.0.0.1", 50000), headers=AUTH) as client:  # a loopback client, as ours
        yield client


def replicas(model: str) -> list[dict[str, str]]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::deepserve.{model}#{model}#")]


def replica_metrics(model: str, replica: str) -> str:
    """The Prometheus text of one replica (Ray's handle broadcast asks every replica of the deployment)."""
    from ray import serve

    handle = serve.get_deployment_handle(model, app_name=f"deepserve.{model}")
    answers = dict(handle.broadcast("metrics").results(timeout_s=30))
    assert replica in answers, (replica, sorted(answers))
    return answers[replica]


def sample(text: str, metric: str, model: str) -> float:
    pattern = re.compile(rf'^{metric}{{model="{model}",version="1"}} (\S+)$', re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


REQUESTS: list[tuple[str, str, dict[str, Any] | bytes]] = [
    ("POST", "/v2/models/tiny-cnn/infer", body(images(3, seed=1))),
    ("POST", "/v2/models/tiny-cnn/versions/1/infer", body(images(1, seed=2))),
    ("POST", "/v2/models/tiny-cnn/infer", b"{not json"),
    ("POST", "/v2/models/tiny-cnn/infer", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2]}]}),
    ("POST", "/v2/models/nope/infer", body(images(1, seed=2))),
    ("POST", "/v2/models/tiny-cnn/versions/7/infer", body(images(1, seed=2))),
    ("POST", "/v2/models/tiny-charlm/infer", body(images(1, seed=2))),
    ("POST", "/v2/models/tiny-charlm/generate", {"text_input": "the ", "parameters": {"max_new_tokens": 9,
                                                                                       "temperature": 0}}),
    ("POST", "/v2/models/tiny-charlm/generate", {"text_input": "the ", "parameters": {"max_new_tokens": 8,
                                                                                       "num_beams": 3}}),
    ("POST", "/v2/models/tiny-seq2seq/generate", {"text_input": "12+7", "parameters": {
        "num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 6, "logprobs": 1}}),
    ("POST", "/v2/models/tiny-charlm/generate", {"text_input": "a", "parameters": {"top_p": 2}}),
    ("POST", "/v2/models/tiny-cnn/generate", {"text_input": "a"}),
    ("POST", "/v1/completions", {"model": "tiny-charlm", "prompt": ["a", "b"], "n": 2, "logprobs": 1,
                                 "max_tokens": 3, "seed": 4}),
    ("POST", "/v1/completions", {"model": "tiny-charlm", "prompt": "a", "max_tokens": 2_000_000}),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "a"}),
    ("POST", "/v1/completions", b"{not json"),
    ("GET", "/v2/models", b""),
    ("GET", "/v2/models/tiny-charlm", b""),
    ("GET", "/v2/models/tiny-cnn/config", b""),
    ("GET", "/v1/models", b""),
    ("POST", "/v2/repository/index", b""),
]


def _png(seed: int) -> bytes:
    from deepserve.clients.tensors import png_bytes

    return png_bytes(np.random.default_rng(seed).random((8, 8), dtype=np.float32))


UPLOADS: list[tuple[str, dict[str, Any]]] = [  # bodies with their own headers: encodings, images, multipart
    ("/v2/models/tiny-cnn/infer", {"content": gzip.compress(json.dumps(body(images(2, seed=3))).encode()),
                                   "headers": {"content-encoding": "gzip", "content-type": "application/json"}}),
    ("/v2/models/tiny-cnn/infer", {"content": b"x" * 10, "headers": {"content-encoding": "br"}}),
    ("/predictions/tiny-cnn?top_k=3", {"content": _png(1), "headers": {"content-type": "image/png"}}),
    ("/predictions/tiny-cnn", {"files": [("data", ("a.png", _png(2), "image/png")),
                                         ("data", ("b.png", _png(3), "image/png"))]}),
    ("/predictions/tiny-cnn?top_k=0", {"content": _png(1), "headers": {"content-type": "image/png"}}),
    ("/predictions/tiny-cnn", {"content": b"not an image", "headers": {"content-type": "image/png"}}),
]


def test_answers_are_the_plain_servers(cluster: dict[str, Any], plain: Any) -> None:
    """Every answer, errors included, is the one ``deepserve serve`` gives: status and body."""
    with httpx.Client(base_url=cluster["base"], timeout=60, headers=AUTH) as ray_client:
        for method, path, payload in REQUESTS:
            kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
            ours, theirs = ray_client.request(method, path, **kwargs), plain.request(method, path, **kwargs)
            assert (ours.status_code, ours.headers["content-type"]) == (theirs.status_code,
                                                                        theirs.headers["content-type"]), path
            mine, reference = ours.json(), theirs.json()
            if path == "/v1/completions" and ours.status_code == 200:
                for answer in (mine, reference):  # a fresh id and clock per answer
                    answer.pop("id"), answer.pop("created")
            assert mine == reference, (method, path, payload)
        for path, kwargs in UPLOADS:
            ours, theirs = ray_client.post(path, **kwargs), plain.post(path, **kwargs)
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), path


def test_startup_says_where_and_prints_example_requests(cluster: dict[str, Any]) -> None:
    text = cluster["log"].read_text()
    assert "serving" in text and f"http://127.0.0.1:{cluster['port']}" in text
    assert "predictions/tiny-cnn" in text and "/v1/completions" in text  # the same examples as deepserve serve


def test_keys_and_cors_are_the_plain_servers(cluster: dict[str, Any]) -> None:
    base, x = cluster["base"], body(images(1, seed=5))
    refused = httpx.post(f"{base}/v2/models/tiny-cnn/infer", json=x, timeout=30)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "API key" in refused.json()["error"]
    wrong = httpx.post(f"{base}/v2/models/tiny-cnn/infer", json=x, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]
    assert httpx.post(f"{base}/v2/models/tiny-cnn/infer", json=x, headers=AUTH, timeout=30).status_code == 200
    assert httpx.post(f"{base}/v2/models/tiny-cnn/infer", json=x, headers=ADMIN, timeout=30).status_code == 200
    assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401  # --metrics-auth
    assert httpx.get(f"{base}/v2/health/ready", timeout=30).status_code == 200  # open, as on the plain server
    preflight = httpx.options(f"{base}/v2/models/tiny-cnn/infer", timeout=30, headers={
        "origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    answer = httpx.post(f"{base}/v2/models/tiny-cnn/infer", json=x, headers={**AUTH, "origin": ORIGIN}, timeout=30)
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert len(answer.headers.get_list("x-request-id")) == 1
    named = httpx.post(f"{base}/v2/models/tiny-cnn/infer", json=x, headers={**AUTH, "x-request-id": "abc-1"})
    assert named.headers.get_list("x-request-id") == ["abc-1"]  # the client's id, answered once
    assert httpx.get(f"{base}/v2/models", headers=AUTH).headers.get_list("x-request-id")[0] != "abc-1"
    stranger = httpx.options(f"{base}/v2/models", headers={"origin": "http://elsewhere.example",
                                                           "access-control-request-method": "GET"}, timeout=30)
    assert "access-control-allow-origin" not in stranger.headers


def test_load_deploys_the_models_application_and_unload_deletes_it(cluster: dict[str, Any],
                                                                   repository: Path) -> None:
    """Model control under Ray: load deploys ``deepserve.spare-cnn`` (Ray places its replica), it serves, and
    unload deletes the application; the admin key guards both."""
    from ray import serve

    base, x = cluster["base"], body(images(2, seed=6))
    with httpx.Client(base_url=base, timeout=120) as c:
        index = {r["name"]: r for r in c.post("/v2/repository/index", headers=ADMIN).json()}
        assert index["spare-cnn"]["state"] == "UNAVAILABLE" and "deepserve.spare-cnn" not in serve.status().applications
        assert c.post("/v2/models/spare-cnn/infer", json=x, headers=AUTH).status_code == 503
        assert c.post("/v2/repository/models/spare-cnn/load", headers=AUTH).status_code == 401  # not the admin key
        loaded = c.post("/v2/repository/models/spare-cnn/load", headers=ADMIN)
        assert loaded.status_code == 200 and loaded.json()[0]["state"] == "READY", loaded.text
        assert serve.status().applications["deepserve.spare-cnn"].status == "RUNNING"
        served = c.post("/v2/models/spare-cnn/infer", json=x, headers=AUTH)
        assert served.status_code == 200 and served.headers["x-deepserve-replica"]
        assert len(replicas("spare-cnn")) == 1
        invalid = c.post("/v2/repository/models/spare-cnn/load", headers=ADMIN,
                         json={"parameters": {"config": json.dumps({"max_batch_size": 0})}})
        assert invalid.status_code == 400 and "max_batch_size" in invalid.json()["error"], invalid.text
        kept = c.post("/v2/models/spare-cnn/infer", json=x, headers=AUTH)  # the replica serving before still does
        assert kept.status_code == 200 and kept.headers["x-deepserve-replica"] == served.headers["x-deepserve-replica"]
        unloaded = c.post("/v2/repository/models/spare-cnn/unload", headers=ADMIN)
        assert unloaded.status_code == 200 and unloaded.json()[0]["state"] == "UNAVAILABLE"
        assert "deepserve.spare-cnn" not in serve.status().applications and not replicas("spare-cnn")
        gone = c.post("/v2/models/spare-cnn/infer", json=x, headers=AUTH)
        assert gone.status_code == 503 and "spare-cnn" in gone.json()["error"]
        bad = c.post("/v2/repository/models/spare-cnn/load", headers=ADMIN,
                     json={"parameters": {"config": json.dumps({"ray": {"num_replicas": 2}})}})
        assert bad.status_code == 400 and "ray section of the model's config file" in bad.json()["error"]
        config = repository / "spare-cnn" / "config.json"
        config.write_text(json.dumps({"ray": {"num_replicas": 0}}))
        refused = c.post("/v2/repository/models/spare-cnn/load", headers=ADMIN)
        assert refused.status_code == 400, refused.text
        assert "config.json: ray.num_replicas must be an integer >= 1, got 0" in refused.json()["error"]
        assert "/tmp" not in refused.json()["error"]  # the answer names no server path
        assert "deepserve.spare-cnn" not in serve.status().applications


def spare_state(x: dict[str, Any], c: httpx.Client) -> tuple[str, str | None, int]:
    """spare-cnn's state in the ingress's index, its application's status in Ray, and what an inference gets."""
    from ray import serve

    index = {r["name"]: r for r in c.post("/v2/repository/index", headers=ADMIN).json()}
    app = serve.status().applications.get("deepserve.spare-cnn")
    return index["spare-cnn"]["state"], app.status if app else None, c.post(
        "/v2/models/spare-cnn/infer", json=x, headers=AUTH).status_code


def test_racing_loads_and_unloads_leave_the_index_as_ray_serves(cluster: dict[str, Any], repository: Path) -> None:
    """Loads and unloads of one model sent at once run one after the other (the check, the deploy or delete and
    the index's update under the model's lock): whichever ran last, the index says READY exactly when Ray runs
    the model's application and it serves, and UNAVAILABLE exactly when Ray has none."""
    (repository / "spare-cnn" / "config.json").write_text(json.dumps({"ray": {"num_replicas": 1, "num_cpus": 0.25}}))
    x = body(images(1, seed=7))

    async def race(ops: tuple[str, ...]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster["base"], timeout=60, headers=ADMIN) as c:
            async def call(op: str, delay: float) -> httpx.Response:
                await asyncio.sleep(delay)
                return await c.post(f"/v2/repository/models/spare-cnn/{op}")

            return await asyncio.gather(*(call(op, 0.2 * i) for i, op in enumerate(ops)))

    with httpx.Client(base_url=cluster["base"], timeout=120) as c:
        for ops in (("load",), ("load", "load", "unload", "load", "unload")):  # the race starts from a serving model
            for answer in asyncio.run(race(ops)):
                assert answer.status_code == 200, (ops, answer.text)
            state = spare_state(x, c)
            assert state in {("READY", "RUNNING", 200), ("UNAVAILABLE", None, 503)}, (ops, state)
        assert state == ("UNAVAILABLE", None, 503) and not replicas("spare-cnn")


def test_a_model_whose_replicas_cannot_start_answers_a_clear_400(cluster: dict[str, Any], repository: Path) -> None:
    """A replica none of whose versions loads fails its start (Ray retries it, then fails the deploy): the load
    answers 400 naming the model and each version's reason, and Ray keeps no application. A replica Ray cannot
    place fails the load after the ray section's start_timeout_s, not never; if it replaced serving ones, the
    last deploy that started serves again."""
    import shutil

    from ray import serve

    broken, unplaceable, spare = repository / "broken-cnn", repository / "gpu-cnn", repository / "spare-cnn/config.json"
    for folder, ray_section in ((broken, {"num_cpus": 0.25}), (unplaceable, {"num_gpus": 1, "start_timeout_s": 1})):
        shutil.copytree(repository / "spare-cnn" / "1", folder / "1")
        (folder / "config.json").write_text(json.dumps({"ray": ray_section}))
    with open(broken / "1" / "model.onnx", "ab") as weights:
        weights.write(b"tampered")
    try:
        with httpx.Client(base_url=cluster["base"], timeout=60, headers=ADMIN) as c:
            refused = c.post("/v2/repository/models/broken-cnn/load")
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error.startswith("model 'broken-cnn': its replicas failed to start: no version of model "
                                    "'broken-cnn' loaded (version 1: "), error
            assert "model.onnx" in error and "sha256" in error and "Traceback" not in error and "/tmp" not in error
            row = next(r for r in c.post("/v2/repository/index").json() if r["name"] == "broken-cnn")
            assert row["state"] == "UNAVAILABLE" and "sha256" in row["reason"]
            assert "deepserve.broken-cnn" not in serve.status().applications
            started = time.monotonic()
            pending = c.post("/v2/repository/models/gpu-cnn/load")
            assert pending.status_code == 400 and time.monotonic() - started < 20, pending.text
            assert "gpu-cnn': its replicas did not start within 1 s" in pending.json()["error"]
            again = c.post("/v2/repository/models/gpu-cnn/load")  # while Ray still deletes the first: no leftover
            assert again.status_code == 400 and "did not start within 1 s" in again.json()["error"], again.text
            def deleted() -> bool:  # Ray stops the replica it could not place after the answer
                app = serve.status().applications.get("deepserve.gpu-cnn")
                return app is None or app.status == "DELETING"

            wait_for(deleted, 10, "gpu-cnn's application deleted")
            # a serving model whose redeploy cannot be placed: Ray's rollout stopped its replica for the pending
            # one, so the ingress puts its last deploy that started back, and the model serves as the index says
            assert c.post("/v2/repository/models/spare-cnn/load").status_code == 200
            spare.write_text(json.dumps({"ray": {"num_cpus": 0.25, "num_gpus": 1, "start_timeout_s": 2}}))
            stuck = c.post("/v2/repository/models/spare-cnn/load")
            assert stuck.status_code == 400 and "did not start within 2 s" in stuck.json()["error"], stuck.text
            x = body(images(1, seed=8))  # (Ray's application status follows its deployment's a moment later)
            wait_for(lambda: spare_state(x, c) == ("READY", "RUNNING", 200), 10, "spare-cnn serving again")
            assert c.post("/v2/repository/models/spare-cnn/unload").status_code == 200
    finally:
        shutil.rmtree(broken), shutil.rmtree(unplaceable)
        spare.write_text(json.dumps({"ray": {"num_replicas": 1, "num_cpus": 0.25}}))


def test_a_ray_load_scans_the_repository_once(cluster: dict[str, Any], repository: Path, tmp_path: Path) -> None:
    """A repository of the ingress's kind, in this driver: one load deploys, loads and scans the disk once."""
    import shutil

    from deepserve.serve.ray_control import RayModelRepository
    from deepserve.serve.ray_replica import ServingOptions

    shutil.copytree(repository / "spare-cnn" / "1", tmp_path / "scan-cnn" / "1")
    (tmp_path / "scan-cnn" / "config.json").write_text(json.dumps({"ray": {"num_cpus": 0.25}}))

    class Counted(RayModelRepository):
        scans = 0

        def scan(self) -> None:
            self.scans += 1
            super().scan()

    async def load_and_unload() -> int:
        repo = Counted(tmp_path, ServingOptions(device="cpu"), model_control="explicit")
        await repo.start()
        before = repo.scans
        try:
            await repo.load_model("scan-cnn")
            assert repo.is_ready("scan-cnn")
            return repo.scans - before
        finally:
            await repo.unload_model("scan-cnn")
            await repo.stop()

    assert asyncio.run(load_and_unload()) == 1


def copy_model(repository: Path, into: Path, name: str) -> Path:
    """A copy of ``spare-cnn``'s artifact as model ``name`` of the repository ``into``; its config.json's path."""
    import shutil

    shutil.copytree(repository / "spare-cnn" / "1", into / name / "1")
    config = into / name / "config.json"
    config.write_text(json.dumps({"ray": {"num_cpus": 0.25}}))
    return config


UNPLACEABLE = {"ray": {"num_cpus": 0.25, "num_gpus": 1, "start_timeout_s": 2}}
"""A redeploy Ray cannot place (this cluster has no GPU): Ray's rollout stops the serving replica for it."""


def test_a_restarted_ingress_adopts_the_applications_ray_runs(cluster: dict[str, Any], repository: Path,
                                                              tmp_path: Path) -> None:
    """An ingress that restarts (a new repository of its kind over the same Ray) finds the model's application
    running: it serves it as Ray does, although ``--model-control explicit`` names no model, and a redeploy
    that fails goes back to it as to one this ingress deployed itself; an unload deletes it."""
    from ray import serve

    from deepserve.serve.errors import LoadFailed
    from deepserve.serve.ray_control import RayModelRepository
    from deepserve.serve.ray_replica import ServingOptions

    config = copy_model(repository, tmp_path, "kept-cnn")

    async def restart_then_fail_a_redeploy() -> None:
        first = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit",
                                   load_models=["kept-cnn"])
        await first.start()
        await first.stop()  # the ingress goes; Ray keeps the application
        second = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit")
        await second.start()
        try:
            assert second.is_ready("kept-cnn"), second.summary()
            config.write_text(json.dumps(UNPLACEABLE))
            with pytest.raises(LoadFailed, match="did not start within 2 s"):
                await second.load_model("kept-cnn")
            assert second.is_ready("kept-cnn")
            handle = serve.get_deployment_handle("kept-cnn", app_name="deepserve.kept-cnn")
            assert (await asyncio.wait_for(handle.describe.remote(), 60))[1]["ready"]  # a replica serves it again
        finally:
            await second.unload_model("kept-cnn")
            await second.stop()

    asyncio.run(restart_then_fail_a_redeploy())
    assert "deepserve.kept-cnn" not in serve.status().applications


def test_a_redeploy_whose_rollback_fails_too_unloads_the_model_naming_the_first_failure(
        cluster: dict[str, Any], repository: Path, tmp_path: Path) -> None:
    """The redeploy cannot be placed, and the artifact the last deploy loaded is corrupt by now, so putting that
    deploy back fails too: the answer names the redeploy's failure first, the index says UNAVAILABLE with it, and
    Ray deletes the application (nothing of it serves)."""
    from ray import serve

    from deepserve.serve.errors import LoadFailed
    from deepserve.serve.ray_control import RayModelRepository
    from deepserve.serve.ray_replica import ServingOptions

    config = copy_model(repository, tmp_path, "lost-cnn")

    async def fail_a_redeploy_and_its_rollback() -> tuple[str, list[dict[str, Any]]]:
        repo = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit",
                                  load_models=["lost-cnn"])
        await repo.start()
        try:
            assert repo.is_ready("lost-cnn"), repo.summary()
            config.write_text(json.dumps(UNPLACEABLE))
            with open(tmp_path / "lost-cnn" / "1" / "model.onnx", "ab") as weights:
                weights.write(b"tampered")
            with pytest.raises(LoadFailed) as failed:
                await repo.load_model("lost-cnn")
            return failed.value.message, repo.triton_index()
        finally:
            await repo.stop()

    message, rows = asyncio.run(fail_a_redeploy_and_its_rollback())
    assert message.startswith("model 'lost-cnn': its replicas did not start within 2 s"), message
    assert "putting the last deploy that started back failed too" in message and "sha256" in message, message
    assert [(r["state"], r["reason"].split(";")[0]) for r in rows if r["name"] == "lost-cnn"] == [
        ("UNAVAILABLE", message.removeprefix("model 'lost-cnn': ").split(";")[0])]
    wait_for(lambda: "deepserve.lost-cnn" not in serve.status().applications, 60, "lost-cnn's application deleted")


def deploy_without_waiting(repository: Path, name: str) -> None:
    """Deploy ``name``'s application as an ingress that died at once after would have left it: Ray is still
    placing it (this cluster has no GPU for an UNPLACEABLE one, so it stays DEPLOYING with no replica)."""
    from ray import serve

    from deepserve.serve.ray_app import model_options
    from deepserve.serve.ray_replica import ModelReplica, ServingOptions, model_app

    app = ModelReplica.options(name=name, **model_options(repository / name).deployment_options()).bind(
        str(repository.resolve()), name, ServingOptions(device="cpu"), None)
    serve.run_many([serve.RunTarget(target=app, name=model_app(name), route_prefix=None)],
                   wait_for_applications_running=False)
    assert serve.status().applications[model_app(name)].status == "DEPLOYING"


def test_a_restarted_ingress_adopts_no_application_ray_has_not_started(cluster: dict[str, Any], repository: Path,
                                                                      tmp_path: Path) -> None:
    """Ray is still placing two models' applications when the ingress restarts: it becomes ready anyway. The one
    it loads is deployed anew, failing after its start_timeout_s; the other is deleted (nobody loads it)."""
    from ray import serve

    from deepserve.serve.ray_control import RayModelRepository
    from deepserve.serve.ray_replica import ServingOptions

    for name in ("stuck-cnn", "left-cnn"):
        copy_model(repository, tmp_path, name).write_text(json.dumps(UNPLACEABLE))
        deploy_without_waiting(tmp_path, name)

    async def restart() -> list[dict[str, Any]]:
        repo = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit",
                                  load_models=["stuck-cnn"])
        try:
            await asyncio.wait_for(repo.start(), 60)  # adopting a DEPLOYING application waited forever
            return repo.triton_index()
        finally:
            await asyncio.wait_for(repo.stop(), 60)

    before = set(threading.enumerate())
    rows = {r["name"]: r for r in asyncio.run(restart())}
    assert rows["stuck-cnn"]["state"] == "UNAVAILABLE" and "did not start within 2 s" in rows["stuck-cnn"]["reason"]
    # nothing of the given-up deploy waits on in Ray: a thread left in serve.run's endless wait kept this process's
    # Ray connection after ray.shutdown, and Ray ended the process (exit 1) a minute after the cluster stopped
    left = [t for t in set(threading.enumerate()) - before if "_run_router_event_loop" not in t.name]
    for thread in left:
        thread.join(10)
    assert not [t.name for t in left if t.is_alive()]
    assert rows["left-cnn"]["state"] == "UNAVAILABLE"
    applications = serve.status().applications
    assert "deepserve.stuck-cnn" not in applications and "deepserve.left-cnn" not in applications


def test_deploys_given_up_on_hold_no_executor_thread_and_a_retry_after_their_deletes_serves(
        cluster: dict[str, Any], repository: Path, tmp_path: Path) -> None:
    """Two loads whose replicas cannot be placed time out; on a loop whose default executor has one thread, the
    ingress still answers (serve.run's endless wait held that thread). Then the model is made placeable and
    loaded at once: it serves, and still does once the timed-out deploys' deletes have been sent."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from deepserve.serve.errors import LoadFailed
    from deepserve.serve.ray_control import RayModelRepository
    from deepserve.serve.ray_replica import ServingOptions

    config = copy_model(repository, tmp_path, "late-cnn")
    config.write_text(json.dumps({"ray": {**UNPLACEABLE["ray"], "start_timeout_s": 1}}))

    async def time_out_then_retry() -> bool:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
        repo = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit")
        await asyncio.wait_for(repo.start(), 60)
        try:
            for _ in range(2):
                with pytest.raises(LoadFailed, match="did not start within 1 s"):
                    await asyncio.wait_for(repo.load_model("late-cnn"), 60)  # bounded: without the fix it hangs
            config.write_text(json.dumps({"ray": {"num_cpus": 0.25}}))
            await asyncio.wait_for(repo.load_model("late-cnn"), 120)
            for thread in threading.enumerate():  # every delete of the given-up deploys has been sent by now
                if thread.name == "delete deepserve.late-cnn":
                    thread.join(60)
            app = serve.status().applications.get("deepserve.late-cnn")
            return repo.is_ready("late-cnn") and app is not None and app.status == "RUNNING"
        finally:
            await asyncio.wait_for(repo.unload_model("late-cnn"), 60)
            await asyncio.wait_for(repo.stop(), 60)

    loop = asyncio.new_event_loop()
    try:
        ready = loop.run_until_complete(asyncio.wait_for(time_out_then_retry(), 300))
    finally:
        loop.close()  # (not asyncio.run: it would wait for a thread serve.run holds)
    assert ready


def test_unload_deletes_an_adopted_application_whose_settings_no_longer_load(
        cluster: dict[str, Any], repository: Path, tmp_path: Path) -> None:
    """A restarted ingress cannot load a model whose config file is invalid by now, so it has no handle for it,
    but Ray runs its application: an unload deletes it."""
    from ray import serve

    from deepserve.serve.ray_control import RayModelRepository
    from deepserve.serve.ray_replica import ServingOptions

    config = copy_model(repository, tmp_path, "odd-cnn")

    async def restart_with_a_bad_config() -> bool:
        first = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit",
                                   load_models=["odd-cnn"])
        await first.start()
        await first.stop()
        config.write_text(json.dumps({"max_batch_size": 0, "ray": {"num_cpus": 0.25}}))
        second = RayModelRepository(tmp_path, ServingOptions(device="cpu"), model_control="explicit")
        await second.start()
        try:
            return second.is_ready("odd-cnn")
        finally:
            await second.unload_model("odd-cnn")
            await second.stop()

    assert not asyncio.run(restart_with_a_bad_config())
    assert "deepserve.odd-cnn" not in serve.status().applications


def families(text: str) -> dict[str, list[Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_show_every_replicas_batches_and_generation(cluster: dict[str, Any], plain: Any) -> None:
    """A scrape of the ingress has the plain server's families, with each replica's batch and generation series
    labelled by replica; requests served by either replica of a 2-replica model show up in its series."""

    def per_replica(text: str, family: str, sample: str, model: str) -> dict[str, float]:
        return {s.labels["replica"]: s.value for s in families(text).get(family, [])
                if s.name == sample and s.labels.get("model") == model and "replica" in s.labels}

    with httpx.Client(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
        before = c.get("/metrics").text
        served = Counter(c.post("/v2/models/tiny-cnn/infer", json=body(images(1, seed=i))).headers[
            "x-deepserve-replica"] for i in range(16))
        tokens = Counter()
        for i in range(6):
            r = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "a", "parameters": {
                "max_new_tokens": 5, "seed": i}})
            tokens[r.headers["x-deepserve-replica"]] += 5
        after = c.get("/metrics").text
    assert len(served) == 2, served
    old = per_replica(before, "deepserve_batch_size", "deepserve_batch_size_sum", "tiny-cnn")
    new = per_replica(after, "deepserve_batch_size", "deepserve_batch_size_sum", "tiny-cnn")
    for replica, rows in served.items():  # one row per request, in whichever batch it rode
        assert new[replica] - old.get(replica, 0.0) == rows, (replica, old, new)
    old = per_replica(before, "deepserve_generation_tokens", "deepserve_generation_tokens_total", "tiny-charlm")
    new = per_replica(after, "deepserve_generation_tokens", "deepserve_generation_tokens_total", "tiny-charlm")
    for replica, count in tokens.items():
        assert new[replica] - old.get(replica, 0.0) >= count, (replica, old, new)
    assert set(families(plain.get("/metrics").text)) <= set(families(after))  # the plain server's families
    requests = [s for s in families(after)["deepserve_requests"] if s.labels.get("endpoint") == "infer"
                and s.labels["model"] == "tiny-cnn"]
    assert requests and all("replica" not in s.labels for s in requests)  # counted once, by the ingress


def test_tritonclient_and_requests_spread_over_both_replicas(cluster: dict[str, Any], plain: Any) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{cluster['port']}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny-cnn")
    assert client.get_model_metadata("tiny-cnn", headers=AUTH)["inputs"][0]["shape"] == [-1, 1, 8, 8]
    x = images(5, seed=4)
    out = plain.post("/v2/models/tiny-cnn/infer", json=body(x)).json()["outputs"][0]
    expected = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    for binary in (False, True):
        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("tiny-cnn", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)],
                              headers=dict(AUTH))  # tritonclient adds to the dict it is given
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    client.close()

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
            return await asyncio.gather(*(c.post("/v2/models/tiny-cnn/infer", json=body(x[i % 5 : i % 5 + 1]))
                                          for i in range(60)))

    answers = asyncio.run(many())
    assert all(r.status_code == 200 for r in answers)
    for i, r in enumerate(answers):  # batched across replicas, each row is still its own
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], expected[i % 5], rtol=1e-5, atol=1e-6)
    served = Counter(r.headers["x-deepserve-replica"] for r in answers)
    assert len(served) == 2, served  # both replicas took requests


def test_openai_sdk_completion_stream_and_beam_search(cluster: dict[str, Any]) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=cluster["base"] + "/v1", api_key=API_KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {"tiny-charlm", "tiny-seq2seq"}
    done = client.completions.create(model="tiny-charlm", prompt="the ", max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny-charlm", prompt="the ", max_tokens=12, temperature=0,
                                            stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    beams = client.completions.create(model="tiny-seq2seq", prompt="12+7", max_tokens=8, n=2,
                                      extra_body={"use_beam_search": True, "length_penalty": 0.8})
    assert sorted(c.index for c in beams.choices) == [0, 1]
    with pytest.raises(NotFoundError) as missing:
        client.completions.create(model="nope", prompt="a")
    assert missing.value.code == "model_not_found"
    with httpx.Client(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
        whole = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "ab", "parameters": {
            "num_beams": 2, "max_new_tokens": 6}}).json()
        with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json={"text_input": "ab", "parameters": {
                "num_beams": 2, "max_new_tokens": 6}}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == whole["text_output"]


def test_a_client_that_hangs_up_stops_its_generation_in_the_replica(cluster: dict[str, Any]) -> None:
    """A generation far longer than the test (a million tokens; the request deadline is 30 s) stops within
    seconds of its client hanging up."""
    body_ = {"text_input": "a", "parameters": {"max_new_tokens": 1_000_000, "seed": 1}}

    def running_rows(replica: str) -> float:
        return sample(replica_metrics("tiny-charlm", replica), "deepserve_generation_running_rows", "tiny-charlm")

    with httpx.Client(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
        with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body_) as s:
            replica = s.headers["x-deepserve-replica"]
            next(line for line in s.iter_lines() if line.startswith("data: "))  # tokens are coming
    # Hung up: the replica stops generating long before the deadline would stop it. (Its metrics are read only
    # now: while it streams, Ray routes the handle's calls to the idle replica.)
    wait_for(lambda: running_rows(replica) == 0, 10, "the replica's running rows back to 0 after the client left")


def test_a_non_streaming_client_that_hangs_up_stops_its_generation_too(cluster: dict[str, Any]) -> None:
    """/generate answers once, at the end; a client gone before that still frees its rows (Ray cancels the
    ingress's call and the replica's with it)."""
    import ray

    actors = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in replicas("tiny-charlm")]
    ids = [a["name"].rsplit("#", 1)[1] for a in replicas("tiny-charlm")]

    def ongoing() -> int:  # requests Ray has handed the replicas (an internal counter of Serve's replica actor)
        return sum(ray.get([a.get_num_ongoing_requests.remote() for a in actors], timeout=30))

    payload = json.dumps({"text_input": "a", "parameters": {"max_new_tokens": 1_000_000, "seed": 2}}).encode()
    with socket.create_connection(("127.0.0.1", cluster["port"])) as sock:
        sock.sendall(b"POST /v2/models/tiny-charlm/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nAuthorization: Bearer " + API_KEY.encode() +
                     b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        wait_for(lambda: ongoing() >= 1, 20, "the request reaching a replica")
    wait_for(lambda: all(sample(replica_metrics("tiny-charlm", r), "deepserve_generation_running_rows",
                                "tiny-charlm") == 0 for r in ids), 10, "every replica's running rows back to 0")
    wait_for(lambda: ongoing() == 0, 10, "no request left on the replicas")


def test_replica_loss_under_load_fails_over_or_503s_and_ray_restores_it(cluster: dict[str, Any]) -> None:
    import ray

    victims = replicas("tiny-cnn")
    assert len(victims) == 2
    x = images(1, seed=9)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
            async def infer() -> httpx.Response:
                return await c.post("/v2/models/tiny-cnn/infer", json=body(x))

            first = [asyncio.create_task(infer()) for _ in range(150)]
            await asyncio.sleep(0.2)  # requests are in flight on both replicas
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
            second = [asyncio.create_task(infer()) for _ in range(150)]
            return await asyncio.wait_for(asyncio.gather(*first, *second), 120)  # none may hang

    answers = asyncio.run(load())
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 429, 503}, statuses  # 429: the survivor's queue-delay budget sheds the burst
    for r in answers:
        if r.status_code == 503:
            assert "replica" in r.json()["error"] and r.headers["retry-after"]
        if r.status_code == 429:
            assert r.json()["code"] == "overloaded" and r.headers["retry-after"]
    assert statuses[200] >= 150, statuses  # the surviving replica serves the rest
    lost = re.findall(r'^deepserve_ray_replica_lost_total{model="tiny-cnn",outcome="(\w+)"} (\S+)$',
                      httpx.get(cluster["base"] + "/metrics", headers=AUTH).text, re.M)
    assert float(dict(lost).get("answered_503", 0)) == statuses[503]  # each 503 is a replica lost, counted
    # Ray replaces the replica without anyone asking; then both take requests again
    wait_for(lambda: len(replicas("tiny-cnn")) == 2 and victims[0] not in replicas("tiny-cnn"), 90,
             "a new tiny-cnn replica")

    def both_serve() -> bool:
        with httpx.Client(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
            served = {c.post("/v2/models/tiny-cnn/infer", json=body(x)).headers["x-deepserve-replica"]
                      for _ in range(20)}
        return len(served) == 2

    wait_for(both_serve, 90, "both tiny-cnn replicas answering")
    assert httpx.get(cluster["base"] + "/v2/models/tiny-cnn/ready").status_code == 200


def test_a_stream_whose_replica_dies_ends_with_an_error_event(cluster: dict[str, Any]) -> None:
    """The answer's head is out, so no other replica can take over: the stream ends at once with an error event
    in its protocol's shape (not at the request's deadline, 30 s later, and never hanging)."""
    import ray

    body_ = {"text_input": "a", "parameters": {"max_new_tokens": 1_000_000, "seed": 3}}
    with httpx.Client(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
        with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body_) as s:
            replica = s.headers["x-deepserve-replica"]
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            ray.kill(ray.get_actor(f"SERVE_REPLICA::deepserve.tiny-charlm#tiny-charlm#{replica}", namespace="serve"),
                     no_restart=True)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events[-1]["status"] == 503 and "replica was lost" in events[-1]["error"]
    metrics = httpx.get(cluster["base"] + "/metrics", headers=AUTH).text
    assert 'deepserve_ray_replica_lost_total{model="tiny-charlm",outcome="stream_ended"} 1.0' in metrics


def test_sustained_load_scales_out_to_two_replicas_and_back(cluster: dict[str, Any]) -> None:
    """``tiny-seq2seq`` autoscales (1 to 2 replicas, target 1 ongoing request, short delays): Ray's autoscaler
    adds a replica under sustained load and removes it once the load stops, each within a deadline read from
    Ray's own status API."""

    from ray import serve

    def running() -> int:
        app = serve.status().applications.get("deepserve.tiny-seq2seq")
        return app.deployments["tiny-seq2seq"].replica_states.get("RUNNING", 0) if app else 0

    assert running() == 1
    stop, statuses = threading.Event(), Counter()

    async def load() -> None:
        async with httpx.AsyncClient(base_url=cluster["base"], timeout=60, headers=AUTH) as c:
            async def client(i: int) -> None:
                while not stop.is_set():
                    r = await c.post("/v2/models/tiny-seq2seq/generate", json={"text_input": f"{i}+{i}",
                                     "parameters": {"num_beams": 2, "max_new_tokens": 8}})
                    statuses[r.status_code] += 1

            await asyncio.gather(*(client(i) for i in range(6)))

    worker = threading.Thread(target=asyncio.run, args=(load(),))
    worker.start()
    try:
        wait_for(lambda: running() == 2, 60, "a second tiny-seq2seq replica under load")
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive() and set(statuses) == {200}, statuses
    wait_for(lambda: running() == 1, 60, "tiny-seq2seq back to one replica once the load stopped")


def test_sigterm_drains_and_stops(cluster: dict[str, Any]) -> None:
    """Last: SIGTERM ends the application (replicas drain, Ray stops) and the command exits 0."""
    import ray

    ray.shutdown()  # this driver leaves first
    proc = cluster["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0


# ---- configuration (no Ray needed) ---------------------------------------------------------------------------


def test_a_scrape_collects_the_ingress_registry_once() -> None:
    """The ingress's own families are known once (after its last registration), not collected again per scrape:
    a scrape collects its registry once, to render it."""
    from deepserve.serve.metrics import Metrics
    from deepserve.serve.ray_metrics import ingress_families, scrape

    metrics, collected = Metrics(include_default_registry=False), []

    class Collector:
        def collect(self) -> Iterator[Any]:
            collected.append(1)
            return iter(())

    metrics.registry.register(Collector())
    owned = ingress_families(metrics)
    collected.clear()
    for _ in range(3):
        body_, _ = asyncio.run(scrape(metrics, {}, owned))
        assert b"deepserve_requests" in body_
    assert len(collected) == 3


def test_the_ray_modules_use_only_rays_public_api() -> None:
    """Ray's private parameters, names and modules (a leading underscore) change between its releases without
    notice: serve's Ray modules pass, read and import none, not even through ``asyncio.to_thread``."""
    import ast

    def root(node: ast.AST) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Call)):
            node = node.value if isinstance(node, ast.Attribute) else node.func
        return node.id if isinstance(node, ast.Name) else None

    private = []
    for path in sorted((ROOT / "serve").glob("ray_*.py")):
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = [a.name for n in imports if isinstance(n, ast.Import) for a in n.names] + [
            n.module for n in imports if isinstance(n, ast.ImportFrom) and n.module]
        ray_names = {"ray"} | {a.asname or a.name for n in imports if isinstance(n, ast.ImportFrom)
                               and (n.module or "").split(".")[0] == "ray" for a in n.names}
        private += [f"{path.name}: import {m}" for m in modules
                    if m.split(".")[0] == "ray" and any(part.startswith("_") for part in m.split("."))]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and root(node) in ray_names and node.attr.startswith("_"):
                private.append(f"{path.name}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Call) and any(root(f) in ray_names for f in (node.func, *node.args[:1])):
                private += [f"{path.name}:{node.lineno}: {k.arg}=" for k in node.keywords
                            if k.arg and k.arg.startswith("_")]
    assert not private, private


def test_ray_section_sets_replicas_autoscaling_and_resources(tmp_path: Path) -> None:
    from deepserve.serve.ray_app import model_options
    from deepserve.serve.settings import SettingsError, read_config_file

    configs = {
        "fixed": {"max_batch_size": 8, "ray": {"num_replicas": 3, "num_cpus": 1, "num_gpus": 0.5}},
        "scaled": {"ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                                           "downscale_delay_s": 5}}},
        "plain": {},
        "bad": {"ray": {"num_replicas": 0}},
    }
    for name, config in configs.items():
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert read_config_file(tmp_path / "fixed") == {"max_batch_size": 8}  # the ray section is not a setting
    deployments = {name: model_options(tmp_path / name) for name in ("fixed", "scaled", "plain")}
    assert deployments["fixed"].deployment_options() == {
        "num_replicas": 3, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}}
    scaled = deployments["scaled"].deployment_options()
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                                            "downscale_delay_s": 5}
    assert "num_replicas" not in scaled
    assert deployments["plain"].deployment_options()["num_replicas"] == 1
    with pytest.raises(SettingsError) as bad:
        model_options(tmp_path / "bad")
    assert str(bad.value) == f"{tmp_path / 'bad' / 'config.json'}: ray.num_replicas must be an integer >= 1, got 0"


@pytest.mark.parametrize("section, message", [
    ({"replicas": 2}, "unknown ray settings ['replicas']"),
    ({"num_replicas": 2, "autoscaling": {}}, "ray.num_replicas or ray.autoscaling, not both"),
    ({"num_replicas": 1.5}, "ray.num_replicas must be an integer >= 1, got 1.5"),
    ({"num_cpus": -1}, "ray.num_cpus must be a number >= 0, got -1"),
    ({"num_gpus": "one"}, "ray.num_gpus must be a number >= 0, got 'one'"),
    ({"autoscaling": {"min_replicas": 1}}, "ray.autoscaling must give ['min_replicas', 'max_replicas'"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "delay": 1}},
     "may give ['upscale_delay_s', 'downscale_delay_s', 'look_back_period_s']"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": -1}},
     "ray.autoscaling.upscale_delay_s must be a number >= 0, got -1"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2, "target_ongoing_requests": 4}},
     "ray.autoscaling.max_replicas must be an integer >= 3, got 2"),
    ({"autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 0}},
     "ray.autoscaling.target_ongoing_requests must be a number >= 1, got 0"),
    ({"start_timeout_s": 0}, "ray.start_timeout_s must be a number >= 1, got 0"),
    ([2], "ray must be a mapping, got list"),
])
def test_bad_ray_sections_are_refused_naming_the_file_and_field(tmp_path: Path, section: Any, message: str) -> None:
    from deepserve.serve.ray_app import RayOptions
    from deepserve.serve.settings import SettingsError, read_engine_section

    (tmp_path / "config.json").write_text(json.dumps({"ray": section}))
    with pytest.raises(SettingsError) as refused:
        RayOptions.from_section(*read_engine_section(tmp_path, "ray"))
    assert str(refused.value).startswith(str(tmp_path / "config.json")) and message in str(refused.value)


def test_build_app_is_what_serve_run_imports(repository: Path) -> None:
    """``serve run deepserve.serve.ray_app:build_app repository=DIR`` (binding needs no cluster)."""
    from ray.serve import Application

    from deepserve.serve.ray_app import build_app

    assert isinstance(build_app({"repository": str(repository)}), Application)
    assert isinstance(build_app({"repository": str(repository), "device": "cpu"}), Application)
    with pytest.raises(ValueError, match=r"repository=DIR.*got \['repo'\]"):
        build_app({"repo": str(repository)})
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_app({"repository": str(repository / "nope")})


@pytest.mark.parametrize("flags, message", [
    (["--load-model", "tiny-cnn"], "--load-model needs --model-control explicit"),
    (["--model-control", "explicit", "--load-model", "nope"], "--load-model nope: not in the repository"),
    (["--metrics-auth"], "--metrics-auth needs keys"),
])
def test_bad_flags_are_refused_by_name_before_ray_starts(
        repository: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    from deepserve.cli import main

    assert main(["serve", "--engine", "ray", "--repository", str(repository), "--port", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
