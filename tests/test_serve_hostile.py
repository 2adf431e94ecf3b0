"""Hostile and malformed requests, in process (httpx ASGITransport): each was once a 500, a leak or an unbounded
growth (issue 16), and is now a 4xx with a JSON error body naming the problem."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from deepserve.serve.app import create_app
from deepserve.serve.metrics import UNKNOWN_MODEL
from tests.artifacts import make_charlm_artifact, make_classifier_artifact, tampered_copy

pytestmark = pytest.mark.anyio
INFER = "/v2/models/tiny-cnn/infer"
GENERATE = "/v2/models/tiny-charlm/generate"


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-repo")
    good = make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_charlm_artifact(root, "tiny-charlm")
    tampered_copy(good, root)
    return root


@pytest.fixture(scope="module")
async def app(repo_dir):
    app = create_app(repo_dir, device="cpu", max_json_depth=16)
    await app.state.repository.start()
    yield app
    await app.state.repository.stop()


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def tensor_request(rows: int = 1) -> dict:
    x = np.random.default_rng(0).standard_normal((rows, 1, 8, 8)).astype(np.float32)
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("path, body", [
    (INFER, b'{"inputs": %s}'),
    (GENERATE, b'{"text_input": "a", "parameters": {"stop": %s}}'),
    ("/v1/completions", b'{"model": "tiny-charlm", "prompt": %s}'),
])
async def test_deeply_nested_json_is_a_400_on_every_json_route(client, path, body):
    for depth in (17, 3000, 100_000):  # past --max-json-depth 16; 3000 was a RecursionError 500 on /v2
        r = await client.post(path, content=body % nested(depth), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        text = json.dumps(r.json())
        assert "--max-json-depth" in text and "limit is 16" in text
    inside_strings = json.dumps({"text_input": "[[" * 100 + '"' + "{" * 100, "parameters": {"max_new_tokens": 1}})
    assert (await client.post(GENERATE, content=inside_strings)).status_code == 200  # brackets in strings


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "0", "-5", "1e300", "abc", ""])
async def test_timeout_header_must_be_a_finite_positive_number(client, value):
    r = await client.post(INFER, json=tensor_request(), headers={"x-request-timeout-ms": value})
    assert r.status_code == 400, r.text  # nan was a 500; inf was accepted
    assert "x-request-timeout-ms" in r.json()["error"]


@pytest.mark.parametrize("timeout", ["NaN", "Infinity", "1.5", "-1", "true"])
async def test_triton_timeout_parameter_must_be_an_integer(client, timeout):
    body = json.dumps(tensor_request())[:-1] + ', "parameters": {"timeout": %s}}' % timeout
    r = await client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "parameters.timeout" in r.json()["error"], r.text


async def test_a_valid_timeout_still_serves(client):
    r = await client.post(INFER, json=tensor_request(), headers={"x-request-timeout-ms": "5000"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body", [
    (INFER, json.dumps(tensor_request())),
    (GENERATE, '{"text_input": "a"}'),
    ("/v1/completions", '{"model": "tiny-charlm", "prompt": "a"}'),
])
async def test_text_plain_is_not_a_json_body(client, path, body):
    r = await client.post(path, content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text
    assert "application/json" in json.dumps(r.json())
    ok = await client.post(path, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert ok.status_code == 200, ok.text  # curl -d's default type stays accepted


async def test_readiness_of_an_unknown_model_is_404_and_not_ready_carries_an_error(client):
    r = await client.get("/v2/models/no-such-model/ready")
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]
    r = await client.get("/v2/models/tampered/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and "error" in r.json()
    assert (await client.get("/v2/models/tiny-cnn/ready")).json() == {"name": "tiny-cnn", "ready": True}


async def test_method_not_allowed_names_every_method_of_the_path(client):
    r = await client.options("/predictions/tiny-cnn")
    assert r.status_code == 405 and r.headers["allow"] == "POST, PUT"  # was PUT alone
    assert "POST" in r.json()["error"]
    for path in (INFER, GENERATE, "/v1/completions"):
        r = await client.options(path)
        assert r.status_code == 405 and "POST" in r.headers["allow"], path


async def test_unknown_model_names_share_one_metrics_label(client):
    for i in range(50):
        assert (await client.post(f"/v2/models/random-{i}/infer", json=tensor_request())).status_code == 404
        assert (await client.get(f"/v2/models/other-{i}")).status_code == 404
    text = (await client.get("/metrics")).text
    assert "random-" not in text and "other-" not in text  # each was a new series
    assert f'model="{UNKNOWN_MODEL}"' in text and 'model="tiny-cnn"' in text


async def test_answers_hold_no_filesystem_paths(client, repo_dir):
    index = (await client.get("/v2/models")).text
    tampered = (await client.post("/v2/models/tampered/infer", json=tensor_request())).text
    for text in (index, tampered):
        assert "sha256 mismatch" in text and "tampered/1/model.onnx" in text
        assert str(repo_dir) not in text and str(repo_dir.resolve()) not in text


async def test_a_failing_model_answers_in_user_terms_and_logs_the_details_under_the_request_id(app, client, caplog):
    batcher = app.state.repository.get("tiny-cnn").batchers[0]
    real = batcher.fn

    def broken(inputs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : /onnxruntime_src/core/providers/x.cc:42 "
                           "Reshape failed")

    batcher.fn = broken
    try:
        r = await client.post(INFER, json=tensor_request(), headers={"x-request-id": "req-42"})
    finally:
        batcher.fn = real
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
    assert "ONNXRuntime" not in r.text and "/onnxruntime_src" not in r.text and "X-Request-Id" in r.json()["error"]
    failed = [rec for rec in caplog.records if "Reshape failed" in rec.getMessage() or
              (rec.exc_info and "Reshape failed" in str(rec.exc_info[1]))]
    assert failed and any("req-42" in rec.getMessage() for rec in failed)  # the log has it, by request id


async def test_an_unexpected_error_is_a_json_500_naming_the_request_id(app, client):
    servable = app.state.repository.get("tiny-cnn")
    real = servable.infer

    async def bug(*args, **kwargs):
        raise KeyError("/srv/secret/path")

    servable.infer = bug
    try:
        r = await client.post(INFER, json=tensor_request())  # the hot path; it was a plain-text 500
    finally:
        del servable.infer
    assert servable.infer == real
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] in r.json()["error"] and "secret" not in r.text


async def test_request_ids_are_echoed_made_or_refused(client):
    r = await client.get("/v2/health/live", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = {(await client.get("/v2/models/nope")).headers["x-request-id"] for _ in range(3)}
    assert len(made) == 3 and all(len(i) == 24 for i in made)  # distinct, and valid ids themselves
    r = await client.get("/v2/health/live", headers={"x-request-id": "bad id\twith spaces"})
    assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]
    r = await client.get("/v2/health/live", headers={"x-request-id": "x" * 129})
    assert r.status_code == 400


async def test_a_batch_larger_than_the_queue_can_ever_hold_is_413(client):
    settings = (await client.get("/v2/models/tiny-cnn/config")).json()
    too_many = settings["max_batch_size"] * 1024 + 1  # default max_queue_size 1024
    binary = np.zeros((too_many, 1, 8, 8), dtype=np.float32).tobytes()  # the binary extension: 8 MB, not 40
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [too_many, 1, 8, 8],
                                     "parameters": {"binary_data_size": len(binary)}}]}).encode()
    r = await client.post(INFER, content=header + binary, headers={"inference-header-content-length": str(len(header))})
    assert r.status_code == 413 and "max_queue_size" in r.json()["error"], r.text  # was 429, "retry later"


async def test_the_reliability_sweep_is_answered_with_4xx_json_errors(client):
    from benchmarks.hostile import hostile_requests

    for name, method, path, kwargs in hostile_requests("tiny-cnn", "tiny-charlm"):
        r = await client.request(method, path, **kwargs)
        assert 400 <= r.status_code < 500, f"{name}: {r.status_code} {r.text[:200]}"
        assert r.headers["content-type"] == "application/json" and r.json()["error"], name
    assert (await client.get("/v2/health/ready")).status_code == 200


async def test_a_generate_stream_flag_of_another_type_is_refused(client):
    for path in (GENERATE, GENERATE + "_stream"):
        r = await client.post(path, json={"text_input": "a", "parameters": {"stream": {}, "max_new_tokens": 1}})
        assert r.status_code == 400 and "stream" in r.json()["error"], r.text  # was accepted and ignored
    assert (await client.post(GENERATE, json={"text_input": "a", "parameters": {"stream": False,
                                                                                 "max_new_tokens": 1}})).status_code == 200
