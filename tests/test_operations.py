"""Operating a live server on a real socket: rollouts under load with zero failures, unload under load, model
control through tritonclient / the SDK / the CLI, API keys on every route family, and the request limits."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.artifacts import make_charlm_artifact, make_classifier_artifact
from tests.live_server import ROOT, running_server

USER, ADMIN, FILE_KEY = "user-key-5f1c", "admin-key-9e2a", "file-key-1"
AS_USER = {"Authorization": f"Bearer {USER}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
LM_PARAMS = {"max_new_tokens": 16, "temperature": 0.0}
X = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
INFER_BODY = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": X.ravel().tolist()}]}


@pytest.fixture(scope="module")
def staging(tmp_path_factory) -> Path:
    """Version 1 and 2 of a classifier and of a char-LM, with different weights."""
    root = tmp_path_factory.mktemp("staging")
    for v in (1, 2):
        make_classifier_artifact(root, "tiny-cnn", version=v, seed=10 + v, quantize=False)
        make_charlm_artifact(root, "tiny-charlm", version=v, seed=10 + v, quantize=False)
    return root


@pytest.fixture(scope="module")
def server(staging, tmp_path_factory):
    repo = tmp_path_factory.mktemp("ops-repo")
    for name in ("tiny-cnn", "tiny-charlm"):
        shutil.copytree(staging / name / "1", repo / name / "1")
    key_file = repo.parent / "keys.txt"
    key_file.write_text(f"# rotated by editing\n{FILE_KEY}\n")
    flags = ("--api-key", USER, "--api-key-file", str(key_file), "--metrics-auth", "--max-body-mb", "0.25",
             "--max-image-pixels", "20000", "--cors-allow-origin", "https://ui.example")
    log_dir = tmp_path_factory.mktemp("ops-log")
    with running_server(repo, log_dir, *flags, env={"DEEPSERVE_ADMIN_API_KEY": ADMIN}) as live:
        yield {**live, "repository": repo, "key_file": key_file}


# ---------------------------------------------------------------------------------------------- rollout


async def _classify(client: httpx.AsyncClient, seen: list, failures: list) -> None:
    r = await client.post("/v2/models/tiny-cnn/infer", json=INFER_BODY)
    if r.status_code != 200:
        failures.append(("infer", r.status_code, r.text))
        return
    answer = r.json()
    seen.append(("cnn", answer["model_version"], answer["outputs"][0]["data"]))


async def _stream(client: httpx.AsyncClient, seen: list, failures: list) -> None:
    body = {"text_input": "the ", "parameters": LM_PARAMS}
    async with client.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body) as r:
        if r.status_code != 200:
            failures.append(("stream", r.status_code, (await r.aread()).decode()))
            return
        versions, text = set(), ""
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    failures.append(("stream", event))
                    return
                versions.add(event["model_version"])
                text += event["text_output"]
    seen.append(("lm", versions, text))


async def _load_until(stop: asyncio.Event, call, *args) -> None:
    while not stop.is_set():
        try:
            await call(*args)
        except httpx.HTTPError as e:  # a reset or a timeout is a failure like any other
            args[-1].append(("transport", repr(e)))


async def _reference(client: httpx.AsyncClient, version: str) -> tuple[list[float], str]:
    r = await client.post(f"/v2/models/tiny-cnn/versions/{version}/infer", json=INFER_BODY)
    g = await client.post(f"/v2/models/tiny-charlm/versions/{version}/generate",
                          json={"text_input": "the ", "parameters": LM_PARAMS})
    assert r.status_code == 200 and g.status_code == 200, (r.text, g.text)
    return r.json()["outputs"][0]["data"], g.json()["text_output"]


@pytest.mark.anyio
async def test_reloads_and_a_new_version_under_mixed_load_fail_no_request(server, staging):
    """12 classification clients and 6 streaming generations run for at least 10 s while both models are
    reloaded three times and a version 2 of each is added (and becomes the default)."""
    seen: list = []
    failures: list = []
    stop = asyncio.Event()
    # idle connections are dropped before the server's keep-alive timeout can close one under a new request
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=server["base"], headers=AS_USER, timeout=60, limits=limits) as client:
        started = time.monotonic()
        workers = [asyncio.create_task(_load_until(stop, _classify, client, seen, failures)) for _ in range(12)]
        workers += [asyncio.create_task(_load_until(stop, _stream, client, seen, failures)) for _ in range(6)]
        for _ in range(3):
            for name in ("tiny-cnn", "tiny-charlm"):
                r = await client.post(f"/v2/repository/models/{name}/load", headers=AS_ADMIN)
                assert r.status_code == 200 and r.json()[0]["state"] == "READY", r.text
        served_before_v2 = len(seen)
        for name in ("tiny-cnn", "tiny-charlm"):
            shutil.copytree(staging / name / "2", server["repository"] / name / "2")
            r = await client.post(f"/v2/repository/models/{name}/load", headers=AS_ADMIN)
            assert [row["state"] for row in r.json()] == ["READY", "READY"], r.text
        await asyncio.sleep(max(3.0, 10.0 - (time.monotonic() - started)))  # keep the load on after the rollout
        stop.set()
        await asyncio.gather(*workers)
        assert time.monotonic() - started >= 10.0
        references = {v: await _reference(client, v) for v in ("1", "2")}
    assert failures == [], failures[:5]
    assert served_before_v2 > 0 and len(seen) > served_before_v2, (served_before_v2, len(seen))
    for kind, version, output in seen:  # each answer comes whole from the one version it names
        if kind == "cnn":
            np.testing.assert_allclose(output, references[version][0], rtol=1e-5, atol=1e-6, err_msg=version)
        else:
            assert len(version) == 1, f"one stream named versions {version}"
            assert output == references[next(iter(version))][1], (version, output, references)
    by_version = {(kind, v if isinstance(v, str) else next(iter(v))) for kind, v, _ in seen}
    assert {("cnn", "1"), ("cnn", "2"), ("lm", "1"), ("lm", "2")} <= by_version, by_version
    assert references["1"] != references["2"]


@pytest.mark.anyio
async def test_unload_under_load_answers_503_naming_the_state(server):
    statuses: list[int] = []
    bodies: list[dict] = []
    errors: list[str] = []
    enough = asyncio.Event()
    stop = asyncio.Event()

    limits = httpx.Limits(keepalive_expiry=2.0)  # see the test above
    async with httpx.AsyncClient(base_url=server["base"], headers=AS_USER, timeout=60, limits=limits) as client:
        async def worker() -> None:
            while not stop.is_set():
                try:
                    r = await client.post("/v2/models/tiny-cnn/versions/1/infer", json=INFER_BODY)
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                statuses.append(r.status_code)
                if r.status_code != 200:
                    bodies.append(r.json())
                    if len(bodies) >= 20:
                        stop.set()
                elif statuses.count(200) >= 20:
                    enough.set()

        workers = [asyncio.create_task(worker()) for _ in range(16)]
        await enough.wait()
        r = await client.post("/v2/repository/models/tiny-cnn/unload", headers=AS_ADMIN)
        assert r.status_code == 200 and {row["state"] for row in r.json()} == {"UNAVAILABLE"}
        await asyncio.gather(*workers)
        r = await client.post("/v2/repository/models/tiny-cnn/load", headers=AS_ADMIN)  # back, for the tests after
        assert r.status_code == 200
    assert errors == [] and set(statuses) == {200, 503}, (errors[:5], sorted(set(statuses)))
    for body in bodies:
        assert body["code"] == "model_unavailable" and ("UNLOADING" in body["error"] or "UNAVAILABLE" in body["error"])


# ---------------------------------------------------------------------------------------------- model control


def test_poll_mode_serves_a_new_version_once_it_is_copied(staging, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(staging / "tiny-cnn" / "1", repo / "tiny-cnn" / "1")
    with running_server(repo, tmp_path, "--model-control", "poll", "--poll-interval", "0.2") as live, \
            httpx.Client(base_url=live["base"], timeout=60) as http:
        assert http.post("/v2/models/tiny-cnn/infer", json=INFER_BODY).json()["model_version"] == "1"
        shutil.copytree(staging / "tiny-cnn" / "2", repo / "tiny-cnn" / "tmp-2")
        (repo / "tiny-cnn" / "tmp-2").rename(repo / "tiny-cnn" / "2")  # how to copy in: whole, then renamed
        for _ in range(600):  # bounded: the next rescans load it
            rows = http.post("/v2/repository/index").json()
            if {r["version"]: r["state"] for r in rows}.get("2") == "READY":
                break
            time.sleep(0.1)
        assert http.post("/v2/models/tiny-cnn/infer", json=INFER_BODY).json()["model_version"] == "2"
        assert "versions [2] added or changed" in live["stderr"].read_text()



def test_explicit_mode_loads_the_named_models_and_the_cli_loads_the_rest_on_loopback(staging, tmp_path):
    with running_server(staging, tmp_path, "--model-control", "explicit", "--load-model", "tiny-cnn") as live, \
            httpx.Client(base_url=live["base"], timeout=60) as http:
        rows = {(r["name"], r["version"]): r for r in http.post("/v2/repository/index").json()}
        assert rows[("tiny-cnn", "2")]["state"] == "READY"
        assert rows[("tiny-charlm", "1")]["state"] == "UNAVAILABLE"
        assert "--model-control explicit" in rows[("tiny-charlm", "1")]["reason"]
        r = http.post("/v2/models/tiny-charlm/generate", json={"text_input": "a"})
        assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]
        out = subprocess.run([sys.executable, "-m", "deepserve.cli", "models", "load", "tiny-charlm", "--url",
                              live["base"]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "READY" in out.stdout, out.stderr  # no admin key: loopback may
        assert http.post("/v2/models/tiny-charlm/generate", json={"text_input": "a"}).status_code == 200


def test_tritonclient_model_control_with_headers(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server['port']}")
    with pytest.raises(InferenceServerException, match="admin API key"):
        client.get_model_repository_index()
    rows = client.get_model_repository_index(headers=AS_ADMIN)
    assert {(r["name"], r["state"]) for r in rows} >= {("tiny-cnn", "READY"), ("tiny-charlm", "READY")}
    client.load_model("tiny-cnn", headers=AS_ADMIN, config=json.dumps({"max_batch_size": 3}))
    assert client.get_model_config("tiny-cnn", headers=AS_USER)["max_batch_size"] == 3
    with pytest.raises(InferenceServerException, match="max_batch_size must be an integer >= 1"):
        client.load_model("tiny-cnn", headers=AS_ADMIN, config=json.dumps({"max_batch_size": 0}))
    assert client.is_model_ready("tiny-cnn", headers=AS_USER)  # the failed load left it serving
    client.unload_model("tiny-charlm", headers=AS_ADMIN)
    assert not client.is_model_ready("tiny-charlm")
    rows = client.get_model_repository_index(headers=AS_ADMIN)
    assert {r["reason"] for r in rows if r["name"] == "tiny-charlm"} == {"unloaded"}
    client.load_model("tiny-charlm", headers=AS_ADMIN)
    assert client.is_model_ready("tiny-charlm")


def test_sdk_and_cli_control_models_with_keys(server, monkeypatch):
    from deepserve.clients import AsyncClient, AuthenticationError, Client, ModelUnavailableError

    monkeypatch.setenv("DEEPSERVE_API_KEY", USER)
    with Client(server["base"]) as client:  # the key from the environment
        assert {m.name for m in client.models()} == {"tiny-cnn", "tiny-charlm"}
        with pytest.raises(AuthenticationError):
            client.unload_model("tiny-cnn")
    with Client(server["base"], api_key=ADMIN, max_retries=3) as admin:
        assert all(r.state == "READY" for r in admin.repository_index(ready=True))
        assert {r.state for r in admin.unload_model("tiny-cnn")} == {"UNAVAILABLE"}
        slept: list[float] = []
        admin._sleep = slept.append  # type: ignore[method-assign]
        with pytest.raises(ModelUnavailableError, match="UNAVAILABLE"):
            admin.infer("tiny-cnn", {"images": X})
        assert slept == []  # not retried as if it were overload

    async def index_async() -> list:
        async with AsyncClient(server["base"], api_key=ADMIN) as client:
            return await client.repository_index()

    assert {r.state for r in asyncio.run(index_async()) if r.name == "tiny-cnn"} == {"UNAVAILABLE"}
    env = {**os.environ, "DEEPSERVE_ADMIN_API_KEY": ADMIN}
    env.pop("DEEPSERVE_API_KEY")
    out = subprocess.run([sys.executable, "-m", "deepserve.cli", "models", "load", "tiny-cnn", "--url", server["base"],
                          "--config", '{"max_batch_size": 4}', "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    states = [r["state"] for r in json.loads(out.stdout)]
    assert states and set(states) == {"READY"}


# ---------------------------------------------------------------------------------------------- keys and limits

PROTECTED = [
    ("GET", "/v2", None), ("GET", "/v2/models", None), ("GET", "/v2/models/tiny-cnn", None),
    ("GET", "/v2/models/tiny-cnn/config", None), ("POST", "/v2/models/tiny-cnn/infer", INFER_BODY),
    ("POST", "/v2/models/tiny-cnn/versions/1/infer", INFER_BODY), ("POST", "/predictions/tiny-cnn", None),
    ("POST", "/v2/models/tiny-charlm/generate", {"text_input": "a", "parameters": LM_PARAMS}),
    ("POST", "/v2/models/tiny-charlm/generate_stream", {"text_input": "a", "parameters": LM_PARAMS}),
    ("POST", "/v1/completions", {"model": "tiny-charlm", "prompt": "a", "max_tokens": 2}), ("GET", "/v1/models", None),
    ("GET", "/metrics", None), ("GET", "/no/such/route", None),
]
ADMIN_ONLY = [("POST", "/v2/repository/index", None), ("POST", "/v2/repository/models/nope/unload", None)]
OPEN = ["/v2/health/live", "/v2/health/ready", "/v2/models/tiny-cnn/ready", "/v2/models/tiny-cnn/versions/1/ready",
        "/docs", "/openapi.json"]


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (r.status_code, r.text)
    assert "key" in r.json()["error"]


def test_every_route_family_needs_its_key(server):
    with httpx.Client(base_url=server["base"], timeout=60) as http:
        for method, path, body in PROTECTED + ADMIN_ONLY:
            _assert_401(http.request(method, path, json=body))
            _assert_401(http.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}))
        for method, path, body in PROTECTED:
            for key in (USER, FILE_KEY, ADMIN):  # the admin key opens the user routes too
                r = http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code != 401 and r.status_code < 500, (path, r.status_code, r.text)
        for method, path, body in ADMIN_ONLY:
            _assert_401(http.request(method, path, json=body, headers=AS_USER))
            assert http.request(method, path, json=body, headers=AS_ADMIN).status_code in (200, 404)
        for path in OPEN:
            assert http.get(path).status_code == 200, path
        preflight = http.options("/v2/models/tiny-cnn/infer", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        refused = http.get("/v2/models", headers={"Origin": "https://ui.example"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://ui.example"
        assert "access-control-allow-origin" not in http.get("/v2/health/live",
                                                            headers={"Origin": "https://evil.example"}).headers


def test_key_file_rotation_and_keys_never_logged(server):
    with httpx.Client(base_url=server["base"], timeout=60) as http:
        _assert_401(http.get("/v2/models"))
        assert http.get("/v2/models", headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 200
        server["key_file"].write_text("file-key-2\n")
        _assert_401(http.get("/v2/models", headers={"Authorization": f"Bearer {FILE_KEY}"}))
        assert http.get("/v2/models", headers={"Authorization": "Bearer file-key-2"}).status_code == 200
        server["key_file"].write_text(f"{FILE_KEY}\n")
        metrics = http.get("/metrics", headers=AS_USER).text
    assert 'deepserve_rejected_requests_total{reason="missing_api_key"}' in metrics
    assert 'deepserve_rejected_requests_total{reason="invalid_api_key"}' in metrics
    assert 'deepserve_model_state{model="tiny-cnn",state="READY",version="1"} 1.0' in metrics
    assert "deepserve_model_load_seconds_count" in metrics
    log = server["stderr"].read_text() + server["stdout"].read_text()
    assert all(key not in log for key in (USER, ADMIN, FILE_KEY, "file-key-2")) and "wrong" not in log


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but which carries a few bytes of pixels: what a
    decompression bomb looks like until it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_limits_answer_4xx_naming_the_setting(server):
    with httpx.Client(base_url=server["base"], headers=AS_USER, timeout=60) as http:
        big = http.post("/v2/models/tiny-cnn/infer", content=b"{" + b" " * 300_000 + b"}",
                        headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and "--max-body-mb" in big.json()["error"]
        bomb = http.post("/predictions/tiny-cnn", content=png_header_only(30_000, 30_000),
                         headers={"Content-Type": "image/png"})
        assert bomb.status_code == 400 and "--max-image-pixels" in bomb.json()["error"]
        assert "900000000 pixels" in bomb.json()["error"]
        wide = http.post("/predictions/tiny-cnn", content=png_header_only(200, 200),
                         headers={"Content-Type": "image/png"})
        assert wide.status_code == 400
        assert "40000 pixels exceeds the limit of 20000 (--max-image-pixels)" in wide.json()["error"]
        long_prompt = http.post("/v2/models/tiny-charlm/generate", json={"text_input": "a" * 600})
        assert long_prompt.status_code == 400 and "max_prompt_length" in long_prompt.json()["error"]
        many = http.post("/v2/models/tiny-charlm/generate", json={"text_input": "a",
                                                                  "parameters": {"max_new_tokens": 10_000}})
        assert many.status_code == 400 and "max_new_tokens" in many.json()["error"]
        metrics = http.get("/metrics").text
    assert 'deepserve_rejected_requests_total{reason="body_too_large"} 1.0' in metrics
    assert 'deepserve_rejected_requests_total{reason="image_pixels"} 2.0' in metrics
    assert 'deepserve_rejected_requests_total{reason="prompt_length"} 1.0' in metrics
    assert 'deepserve_rejected_requests_total{reason="max_new_tokens"} 1.0' in metrics


def test_openai_sdk_with_api_key(server):
    import openai

    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=USER, max_retries=0)
    completion = client.completions.create(model="tiny-charlm", prompt="the ", max_tokens=4, temperature=0)
    assert completion.choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['base']}/v1", api_key="wrong", max_retries=0).models.list()


# ---------------------------------------------------------------------------------------------- defaults
# The defaults of create_app, in process (the flags' own defaults are create_app's, see serve/cli.py).


@pytest.fixture
async def default_app(staging):
    from deepserve.serve.app import create_app

    app = create_app(staging, device="cpu")
    await app.state.repository.start()
    yield app
    await app.state.repository.stop()


@pytest.mark.anyio
async def test_defaults_open_metrics_no_cors_loopback_only_control_and_16mib(default_app):
    def client(host: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=default_app, client=(host, 4000)),
                                 base_url="http://test")

    async with client("10.1.2.3") as remote, client("127.0.0.1") as local:
        r = await remote.get("/metrics", headers={"Origin": "https://ui.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert (await remote.get("/v2/models")).status_code == 200  # no key set: open
        r = await remote.post("/v2/repository/index")
        assert r.status_code == 403 and "only on loopback" in r.json()["error"]
        assert (await local.post("/v2/repository/index")).status_code == 200
        r = await local.post("/v2/models/tiny-cnn/infer", content=b" " * (16 * 1024 * 1024 + 1))
        assert r.status_code == 413 and "16777216 bytes" in r.json()["error"]
        r = await local.post("/predictions/tiny-cnn", content=png_header_only(4097, 4096))
        assert r.status_code == 400 and "exceeds the limit of 16777216" in r.json()["error"]


@pytest.mark.parametrize("argv,message", [
    (["--load-model", "tiny-cnn"], "--load-model needs --model-control explicit"),
    (["--model-control", "explicit", "--load-model", "nope"], "--load-model nope: not in the repository"),
    (["--metrics-auth"], "--metrics-auth needs keys"),
    (["--api-key-file", "/nonexistent/keys.txt"], "API key file /nonexistent/keys.txt: cannot read it"),
    (["--model-control", "poll", "--poll-interval", "0"], "--poll-interval must be > 0"),
])
def test_serve_flags_that_do_not_fit_are_refused_by_name(staging, argv, message, monkeypatch):
    import argparse

    from deepserve.cli import CLIError
    from deepserve.serve import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--repository", str(staging), *argv])
    monkeypatch.setattr("uvicorn.Server.run", lambda self: pytest.fail("the server must not start"))
    with pytest.raises(CLIError, match=message):
        cli.run(args)


def test_a_key_file_that_is_emptied_keeps_the_keys_read_before(tmp_path):
    from deepserve.serve.auth import KeySet

    path = tmp_path / "keys.txt"
    path.write_text("# comment\n\n  k-1  \nk-2\n")
    keys = KeySet(file=path)
    assert keys.matches("k-1") and keys.matches("k-2") and not keys.matches("k-3") and not keys.matches("# comment")
    path.write_text("")  # half written (or emptied by mistake): nobody is locked out
    assert keys.matches("k-1")
    path.write_text("k-3\n")
    assert keys.matches("k-3") and not keys.matches("k-1")
