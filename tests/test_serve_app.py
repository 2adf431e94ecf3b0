"""The app in-process (httpx ASGITransport; the repository is started and stopped explicitly, since
ASGITransport runs no lifespan) over real exported artifacts, plus a gated fake runtime for overload,
deadlines and draining."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from deepserve.serve.app import create_app
from deepserve.serve.classifier import ClassificationServable
from deepserve.serve.repository import ModelRepository
from tests.artifacts import make_charlm_artifact, make_classifier_artifact

pytestmark = pytest.mark.anyio
INFER = "/v2/models/tiny-cnn/infer"


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    """tiny-cnn/1 (good), ts-cnn/1 (the same graph served by TorchScript, max_batch_size 4),
    multi/1 good + multi/2 tampered, and tampered/, corrupt/, unsupported/, empty/ models."""
    root = tmp_path_factory.mktemp("repo")
    good = make_classifier_artifact(root, "tiny-cnn", quantize=False)
    shutil.copytree(good, root / "ts-cnn" / "1")
    (root / "ts-cnn" / "config.json").write_text(json.dumps({"backend": "torchscript", "max_batch_size": 4}))
    for target in ("multi/1", "multi/2", "tampered/1", "corrupt/1", "unsupported/1"):
        shutil.copytree(good, root / target)
    for target in ("multi/2", "tampered/1"):
        manifest = json.loads((root / target / "manifest.json").read_text())
        manifest["version"] = int(target[-1])
        (root / target / "manifest.json").write_text(json.dumps(manifest))
        with open(root / target / "model.onnx", "r+b") as f:  # flip one byte of the graph
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    (root / "corrupt/1/manifest.json").write_text("{ this is not json")
    manifest = json.loads((root / "unsupported/1/manifest.json").read_text())
    manifest["format_version"] = 99
    (root / "unsupported/1/manifest.json").write_text(json.dumps(manifest))
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
async def client(repo_dir):
    app = create_app(repo_dir, device="cpu", max_body_bytes=200_000, max_pixels=50_000)
    await app.state.repository.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c
    await app.state.repository.stop()


def png(seed: int, size: int = 8, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tensor_request(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            **extra}


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


async def logits_of(client, x: np.ndarray, path: str = INFER) -> np.ndarray:
    r = await client.post(path, json=tensor_request(x))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


async def test_health_metadata_and_index_with_broken_artifacts(client):
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    meta = (await client.get("/v2/models/tiny-cnn")).json()
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"][0]["name"] == "logits" and meta["platform"] == "onnxruntime_onnx"
    assert (await client.get("/v2/models/ts-cnn")).json()["platform"] == "pytorch_libtorch"
    index = {m["name"]: m for m in (await client.get("/v2/models")).json()["models"]}
    assert set(index) == {"tiny-cnn", "ts-cnn", "multi", "tampered", "corrupt", "unsupported", "empty"}
    assert index["tiny-cnn"]["ready"] and index["tiny-cnn"]["task"] == "image-classification"
    assert not index["tampered"]["ready"] and "sha256 mismatch" in index["tampered"]["reason"]
    assert not index["corrupt"]["ready"] and "not valid JSON" in index["corrupt"]["reason"]
    assert not index["unsupported"]["ready"] and "format_version 99" in index["unsupported"]["reason"]
    assert not index["empty"]["ready"] and "no version" in index["empty"]["reason"]
    assert index["multi"]["ready"] and "version 2: " in index["multi"]["reason"]  # v1 serves, v2 is refused
    rows = (await client.post("/v2/repository/index")).json()
    assert {"name": "multi", "version": "2", "state": "UNAVAILABLE"}.items() <= next(
        r for r in rows if r["name"] == "multi" and r["version"] == "2").items()
    for path, status in (("/v2/models/tampered/ready", 503), ("/v2/models/multi/versions/2/ready", 503),
                         ("/v2/models/multi/ready", 200), ("/v2/models/multi/versions/1/ready", 200)):
        assert (await client.get(path)).status_code == status, path
    r = await client.post("/v2/models/tampered/infer", json=tensor_request(images(1)))
    assert r.status_code == 503 and "sha256 mismatch" in r.json()["error"]
    assert (await client.get("/v2/models/multi")).json()["versions"] == ["1", "2"]


async def test_batched_equals_unbatched_in_order_and_backends_agree(client):
    x = images(40, seed=1)
    singles = [await logits_of(client, x[i : i + 1]) for i in range(len(x))]
    results = await asyncio.gather(*(logits_of(client, x[i : i + 1]) for i in range(len(x))))
    for single, batched in zip(singles, results):
        np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    whole = await logits_of(client, x)  # one request of 40 rows
    np.testing.assert_allclose(whole, np.concatenate(singles), rtol=1e-5, atol=1e-6)
    ts = await logits_of(client, x, "/v2/models/ts-cnn/infer")  # 40 rows > max_batch_size 4: split and joined
    np.testing.assert_allclose(ts, whole, rtol=1e-4, atol=1e-5)


async def test_binary_tensor_extension_and_bytes_images(client):
    x = images(3, seed=2)
    expected = await logits_of(client, x)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [3, 1, 8, 8],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = await client.post(INFER, content=head + x.tobytes(),
                          headers={"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    out = json.loads(r.content[:n])["outputs"][0]
    got = np.frombuffer(r.content[n:], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    encoded = [png(i) for i in range(2)]
    r = await client.post(INFER, json={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": [
        base64.b64encode(b).decode() for b in encoded]}], "outputs": [{"name": "logits"}]})
    assert r.status_code == 200, r.text
    bytes_logits = np.asarray(r.json()["outputs"][0]["data"]).reshape(2, 10)
    preds = [(await client.post("/predictions/tiny-cnn?top_k=10", content=b)).json() for b in encoded]
    for row, pred in zip(bytes_logits, preds):  # both paths preprocess the same way
        assert pred[0]["label"] == str(int(np.argmax(row)))


async def test_predictions_raw_multipart_and_top_k(client):
    r = await client.put("/predictions/tiny-cnn?top_k=3", content=png(0, size=20, mode="RGB"))  # curl -T
    assert r.status_code == 200, r.text
    top = r.json()
    assert len(top) == 3 and set(top[0]) == {"label", "probability"}
    assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    r = await client.post("/predictions/multi/1", files={"data": ("a.png", png(1)), "more": ("b.png", png(2))})
    assert r.status_code == 200 and len(r.json()) == 2 and len(r.json()[0]) == 5
    full = (await client.post("/predictions/tiny-cnn?top_k=50", content=png(3))).json()
    assert len(full) == 10 and abs(sum(p["probability"] for p in full) - 1) < 1e-6


@pytest.mark.parametrize("method, path, kwargs, status, words", [
    ("post", "/v2/models/nope/infer", {"json": {}}, 404, ["nope"]),
    ("get", "/v2/models/tiny-cnn/versions/7", {}, 404, ["no version 7"]),
    ("post", "/predictions/tiny-cnn/abc", {"content": b"x"}, 404, ["abc"]),
    ("post", INFER, {"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400, ["malformed JSON"]),
    ("post", INFER, {"json": {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0]}]}},
     400, ["'pixels'", "images (FP32 [-1, 1, 8, 8])"]),
    ("post", INFER, {"json": tensor_request(np.zeros((1, 1, 4, 4), np.float32))}, 400,
     ["'images'", "[1, 1, 4, 4]", "FP32 [-1, 1, 8, 8]"]),
    ("post", INFER, {"json": {"inputs": [{"name": "images", "datatype": "INT64", "shape": [1, 1, 8, 8],
                                          "data": [0] * 64}]}}, 400, ["'images'", "INT64", "FP32 [-1, 1, 8, 8]"]),
    ("post", INFER, {"content": b"\x00" * 300_000}, 413, ["300000", "limit"]),
    ("post", INFER, {"content": b"x", "headers": {"content-type": "image/png"}}, 415, ["image/png"]),
    ("post", "/predictions/tiny-cnn", {"json": {"image": "x"}}, 415, ["application/json"]),
    ("post", "/predictions/tiny-cnn?top_k=0", {"content": b"x"}, 400, ["top_k", "'0'"]),
    ("post", "/predictions/tiny-cnn?top_k=many", {"content": b"x"}, 400, ["top_k", "'many'"]),
    ("post", "/predictions/tiny-cnn", {"content": b"GIF89a but not really"}, 400, ["not a decodable image"]),
    ("post", "/predictions/tiny-cnn", {"content": png(0, size=64)[:-40]}, 400, ["truncated"]),
    ("post", "/predictions/tiny-cnn", {"content": png(0, size=300)}, 400, ["decompression bomb"]),
    ("post", "/predictions/tiny-cnn", {"files": {"text": (None, "hello")}}, 400, ["no file part"]),
    ("post", "/predictions/tiny-cnn", {"content": b"x", "headers": {"x-request-timeout-ms": "soon"}}, 400,
     ["x-request-timeout-ms"]),
    ("get", "/no/such/route", {}, 404, ["Not Found"]),
])
async def test_client_errors_are_4xx_with_an_error_body(client, method, path, kwargs, status, words):
    r = await getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_input_values_are_refused_naming_the_input(client, literal):
    x = [round(v, 4) for v in images(1, seed=3).ravel().tolist()]
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x}]})
    body = body.replace(str(x[5]), literal, 1)  # the standard library reads these; orjson alone refuses them
    r = await client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text  # was 200 with null logits
    assert "'images'" in r.json()["error"] and "finite" in r.json()["error"]
    binary = np.full((1, 1, 8, 8), np.nan, dtype=np.float32).tobytes()  # the binary extension too
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                     "parameters": {"binary_data_size": len(binary)}}]}).encode()
    r = await client.post(INFER, content=header + binary,
                          headers={"inference-header-content-length": str(len(header))})
    assert r.status_code == 400 and "finite" in r.json()["error"], r.text


async def test_tiff_is_unsupported_media(client):
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "TIFF")
    r = await client.post("/predictions/tiny-cnn", content=buf.getvalue(), headers={"content-type": "image/tiff"})
    assert r.status_code == 415 and "TIFF" in r.json()["error"]


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0 if want else float("nan")


async def test_metrics_change_as_requests_flow(client):
    before = (await client.get("/metrics")).text
    await logits_of(client, images(2))
    await client.post("/v2/models/tiny-cnn/infer", json={"inputs": []})
    after = (await client.get("/metrics")).text
    ok = dict(model="tiny-cnn", endpoint="infer", status="200")
    bad = dict(model="tiny-cnn", endpoint="infer", status="400")
    assert metric(after, "deepserve_requests_total", **ok) == metric(before, "deepserve_requests_total", **ok) + 1
    assert metric(after, "deepserve_requests_total", **bad) == metric(before, "deepserve_requests_total", **bad) + 1
    batches = dict(model="tiny-cnn", version="1")
    assert metric(after, "deepserve_batch_size_count", **batches) == metric(before, "deepserve_batch_size_count",
                                                                            **batches) + 1
    assert metric(after, "deepserve_inference_seconds_count", **batches) > 0
    assert metric(after, "deepserve_request_latency_seconds_count", model="tiny-cnn", endpoint="infer") > 0
    assert metric(after, "deepserve_model_ready", **batches) == 1.0
    assert metric(after, "deepserve_model_ready", model="tampered", version="1") == 0.0
    assert "deepserve_queue_depth" in after


async def test_openapi_docs(client):
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/v2/models/{model}/infer" in paths and "/predictions/{model}" in paths


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


async def test_openapi_declares_the_hand_parsed_infer_body_responses_and_clean_parameters(client):
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        body = paths[path]["post"]["requestBody"]["content"]
        request = body["application/json"]["schema"]
        assert request["required"] == ["inputs"]
        tensor = request["properties"]["inputs"]["items"]
        assert {"name", "datatype", "shape", "data", "parameters"} <= set(tensor["properties"])
        assert tensor["properties"]["parameters"]["properties"]["binary_data_size"]["type"] == "integer"
        output = request["properties"]["outputs"]["items"]["properties"]["parameters"]["properties"]
        assert output["binary_data"]["type"] == "boolean" and output["classification"]["type"] == "integer"
        assert {"binary_data_output", "timeout"} <= set(request["properties"]["parameters"]["properties"])
        assert body["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
        headers = {p["name"] for p in paths[path]["post"]["parameters"] if p["in"] == "header"}
        assert "Inference-Header-Content-Length" in headers
    # one function per route: the unversioned routes have no stray `version` query parameter
    for path, wanted in (("/v2/models/{model}", ["model"]), ("/v2/models/{model}/versions/{version}",
                                                             ["model", "version"]),
                         ("/v2/models/{model}/ready", ["model"]), ("/v2/models/{model}/config", ["model"]),
                         ("/v2/models/{model}/infer", ["model"]), ("/predictions/{model}", ["model", "top_k"])):
        for operation in paths[path].values():
            assert [p["name"] for p in operation["parameters"] if p["in"] in ("path", "query")] == wanted, path
    declared = {
        ("/v2/models", "get"): "ModelIndex", ("/v2/models/{model}", "get"): "ModelMetadata",
        ("/v2/models/{model}/versions/{version}", "get"): "ModelMetadata",
        ("/v2/models/{model}/infer", "post"): "InferResponse", ("/v2/models/{model}/ready", "get"): "ModelReady",
        ("/v2/models/{model}/config", "get"): "ModelConfig", ("/v2", "get"): "ServerMetadata",
    }
    for (path, method), name in declared.items():
        responses = paths[path][method]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    infer_ok = paths["/v2/models/{model}/infer"]["post"]["responses"]
    assert "application/octet-stream" in infer_ok["200"]["content"]
    assert infer_ok["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    prediction = _resolve(spec, paths["/predictions/{model}"]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"])
    assert {"label", "probability"} <= set(_resolve(spec, prediction["anyOf"][0]["items"])["properties"])
    index = _resolve(spec, {"$ref": "#/components/schemas/ModelIndex"})
    entry = _resolve(spec, index["properties"]["models"]["items"])
    assert {"name", "versions", "ready", "reason", "task"} <= set(entry["properties"])


async def test_answers_match_their_declared_schemas(client):
    from pydantic import TypeAdapter

    from deepserve.serve import schemas

    for path, model in (("/v2", schemas.ServerMetadata), ("/v2/models", schemas.ModelIndex),
                        ("/v2/models/tiny-cnn", schemas.ModelMetadata),
                        ("/v2/models/multi/versions/1", schemas.ModelMetadata),
                        ("/v2/models/tiny-cnn/config", schemas.ModelConfig),
                        ("/v2/models/tiny-cnn/ready", schemas.ModelReady), ("/v2/health/ready", schemas.Ready),
                        ("/v2/health/live", schemas.Live)):
        r = await client.get(path)
        assert r.status_code == 200, path
        model.model_validate(r.json(), strict=True)
    rows = (await client.post("/v2/repository/index")).json()
    TypeAdapter(list[schemas.RepositoryIndexRow]).validate_python(rows, strict=True)
    r = await client.post(INFER, json=tensor_request(images(2), id="req-1"))
    answer = schemas.InferResponse.model_validate(r.json(), strict=True)
    assert answer.id == "req-1" and answer.outputs[0].shape == [2, 10]
    predictions = TypeAdapter(schemas.PredictionsResponse)
    one = predictions.validate_python((await client.post("/predictions/tiny-cnn?top_k=2", content=png(4))).json())
    assert len(one) == 2
    many = (await client.post("/predictions/tiny-cnn", files={"a": ("a.png", png(5)), "b": ("b.png", png(6))})).json()
    assert len(predictions.validate_python(many)) == 2
    missing = await client.get("/v2/models/nope")
    schemas.ErrorBody.model_validate(missing.json(), strict=True)


# ---------------------------------------------------------------------------------- gated runtime


class GatedRuntime:
    """Stands in for a graph runtime: blocks each batch until the test opens the gate."""

    platform = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.rows: list[float] = []

    def run(self, inputs):
        x = inputs["images"]
        self.rows.extend(float(v) for v in x[:, 0, 0, 0])
        self.entered.set()
        self.gate.wait(10)
        return {"logits": np.repeat(x.reshape(len(x), -1)[:, :1], 10, axis=1)}


@pytest.fixture
async def gated(repo_dir):
    runtime = GatedRuntime()

    def factory(manifest, directory, settings, device):
        return ClassificationServable(manifest, directory, settings, device,
                                      runtime_factory=lambda *a: runtime)

    only = repo_dir.parent / f"{repo_dir.name}-gated"
    if not only.exists():
        shutil.copytree(repo_dir / "tiny-cnn", only / "tiny-cnn")
    # inline_batch_ms 0: a gated batch must block the worker thread, not the event loop the test runs on
    repo = ModelRepository(only, overrides={"max_batch_size": 1, "max_queue_size": 2, "inline_batch_ms": 0},
                           device="cpu",
                           servable_factory=factory, use_env=False)
    app = create_app(repo)
    runtime.gate.set()  # warmup passes straight through
    await repo.start()
    await asyncio.to_thread(runtime.entered.wait, 10)  # warmup went through
    runtime.rows.clear()
    runtime.entered.clear()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c, runtime, repo
    runtime.gate.set()
    await repo.stop()


async def test_overflow_answers_429_with_retry_after_and_deadline_504(gated):
    client, runtime, _ = gated
    runtime.gate.clear()
    first = asyncio.ensure_future(logits_of(client, np.full((1, 1, 8, 8), 1.0, np.float32)))
    await asyncio.to_thread(runtime.entered.wait, 10)  # in flight, holding the only instance
    expired = await client.post(INFER, json=tensor_request(np.full((1, 1, 8, 8), 9.0, np.float32)),
                                headers={"x-request-timeout-ms": "30"})
    assert expired.status_code == 504 and "deadline" in expired.json()["error"]
    queued = [asyncio.ensure_future(logits_of(client, np.full((1, 1, 8, 8), v, np.float32))) for v in (2.0, 3.0)]
    while len(gated[2].get("tiny-cnn").batchers[0]._queue) < 2:  # let both reach the queue
        await asyncio.sleep(0)
    r = await client.post(INFER, json=tensor_request(np.full((1, 1, 8, 8), 4.0, np.float32)))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "overloaded" in r.json()["error"]
    runtime.gate.set()
    outs = await asyncio.gather(first, *queued)
    assert [float(o[0, 0]) for o in outs] == [1.0, 2.0, 3.0]
    assert 9.0 not in runtime.rows, "the expired request reached the model"


async def test_stop_drains_in_flight_and_queued_work(gated):
    client, runtime, repo = gated
    runtime.gate.clear()
    pending = [asyncio.ensure_future(logits_of(client, np.full((1, 1, 8, 8), v, np.float32))) for v in (5.0, 6.0)]
    await asyncio.to_thread(runtime.entered.wait, 10)
    stopping = asyncio.ensure_future(repo.stop())
    await asyncio.sleep(0)
    r = await client.post(INFER, json=tensor_request(np.zeros((1, 1, 8, 8), np.float32)))
    assert r.status_code == 503
    assert (await client.get("/v2/health/ready")).status_code == 503
    runtime.gate.set()
    outs = await asyncio.gather(*pending)
    await stopping
    assert [float(o[0, 0]) for o in outs] == [5.0, 6.0]


# ---------------------------------------------------------------------------------- a generation model


@pytest.fixture(scope="module")
async def gen_client(tmp_path_factory):
    """tiny-charlm/1 (ONNX only) next to tiny-cnn/1."""
    root = tmp_path_factory.mktemp("gen-repo")
    make_charlm_artifact(root, formats=("onnx",), quantize=False)
    make_classifier_artifact(root, "tiny-cnn", formats=("onnx",), quantize=False)
    app = create_app(root, device="cpu", settings={"backend": "onnx"})
    await app.state.repository.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c
    await app.state.repository.stop()


async def test_metrics_expose_generation_metrics_next_to_request_counters(gen_client):
    labels = dict(model="tiny-charlm", version="1")
    before = (await gen_client.get("/metrics")).text
    r = await gen_client.post("/v2/models/tiny-charlm/generate",
                              json={"text_input": "ab", "parameters": {"temperature": 0, "max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    after = (await gen_client.get("/metrics")).text
    generated = metric(after, "deepserve_generation_tokens_total", **labels)
    assert generated == metric(before, "deepserve_generation_tokens_total", **labels) + 3
    for name in ("deepserve_generation_time_to_first_token_seconds_count",
                 "deepserve_generation_finished_sequences_total"):
        assert metric(after, name, **labels) == metric(before, name, **labels) + 1, name
    for name in ("deepserve_generation_time_per_output_token_seconds_count", "deepserve_generation_running_rows",
                 "deepserve_generation_waiting_requests", "deepserve_generation_step_seconds_count"):
        assert f"{name}{{" in after, name
    ok = dict(model="tiny-charlm", endpoint="generate", status="200")
    assert metric(after, "deepserve_requests_total", **ok) == metric(before, "deepserve_requests_total", **ok) + 1
    assert metric(after, "deepserve_model_ready", **labels) == 1.0
    assert after.count("# TYPE deepserve_requests_total counter") == 1  # each family once


async def test_wrong_endpoint_for_the_task_says_which_task_with_its_article(gen_client):
    from deepserve.serve.servable import task_phrase

    assert task_phrase("image-classification") == "an image-classification model"
    assert task_phrase("char-lm") == "a char-lm model" and task_phrase("seq2seq") == "a seq2seq model"
    r = await gen_client.post("/v2/models/tiny-charlm/infer", json=tensor_request(images(1)))
    assert r.status_code == 400
    assert "model 'tiny-charlm' is a char-lm model and does not take tensor infer requests" in r.json()["error"]
    r = await gen_client.post("/predictions/tiny-charlm", content=png(0))
    assert r.status_code == 400 and "is a char-lm model, not an image classifier" in r.json()["error"]
