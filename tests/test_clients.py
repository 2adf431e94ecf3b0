"""SDK unit tests over httpx.MockTransport: request building, tensor and image encodings, response parsing,
error mapping and retry decisions, for the sync and the async client."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from typing import Any, Callable

import httpx
import numpy as np
import pytest
from deepserve.clients import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ModelUnavailableError,
    NotFoundError,
    OverloadedError,
    RequestTimeoutError,
    ServerError,
)
from deepserve.clients._base import SSEDecoder
from deepserve.clients.errors import DeepserveError
from deepserve.clients.tensors import HEADER_LENGTH, decode_outputs, encode_inputs, png_bytes, split_body

Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, **kwargs: Any) -> tuple[Client, list[float]]:
    """A client whose sleeps are recorded instead of slept."""
    client = Client("http://test", transport=httpx.MockTransport(handler), **kwargs)
    sleeps: list[float] = []
    client._sleep = sleeps.append  # type: ignore[method-assign]
    return client, sleeps


def make_async(handler: Handler, **kwargs: Any) -> tuple[AsyncClient, list[float]]:
    client = AsyncClient("http://test", transport=httpx.MockTransport(handler), **kwargs)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client._sleep = sleep  # type: ignore[method-assign]
    return client, sleeps


# ---- request building and parsing ---------------------------------------------------------------------


def test_classify_numpy_image_sends_png_with_top_k_version_and_api_key() -> None:
    from PIL import Image

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[{"label": "7", "probability": 0.9}, {"label": "1", "probability": 0.05}])

    pixels = np.arange(8 * 6, dtype=np.uint8).reshape(8, 6) * 5
    client, _ = make_client(handler, api_key="sekret")
    with client:
        preds = client.classify(pixels, "digits cnn", version=2, top_k=2)
    assert [(p.label, p.probability) for p in preds] == [("7", 0.9), ("1", 0.05)]
    request = seen[0]
    assert request.method == "POST"
    assert request.url.raw_path.startswith(b"/predictions/digits%20cnn/2?")
    assert request.url.params["top_k"] == "2"
    assert request.headers["authorization"] == "Bearer sekret"
    assert request.headers["content-type"] == "image/png"
    decoded = np.asarray(Image.open(io.BytesIO(request.content)))
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("shape", [(5, 4, 3), (5, 4, 4), (5, 4, 1)])
def test_png_encoder_round_trips_color_arrays(shape: tuple[int, ...]) -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(pixels))))
    np.testing.assert_array_equal(decoded, pixels[:, :, 0] if shape[2] == 1 else pixels)


def test_classify_accepts_paths_bytes_and_pil_images(tmp_path) -> None:
    from PIL import Image

    bodies: list[tuple[bytes, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append((request.content, request.headers["content-type"]))
        return httpx.Response(200, json=[])

    image = Image.new("RGB", (3, 2), (10, 20, 30))
    path = tmp_path / "x.jpg"
    image.save(path, format="JPEG")
    client, _ = make_client(handler)
    client.classify(path, "m")
    client.classify(path.read_bytes(), "m")
    client.classify(image, "m")
    assert bodies[0] == (path.read_bytes(), "image/jpeg")
    assert bodies[1] == (path.read_bytes(), "image/jpeg")  # sniffed from the magic bytes
    assert bodies[2][1] == "image/png" and Image.open(io.BytesIO(bodies[2][0])).size == (3, 2)
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        client.classify(tmp_path / "missing.png", "m")
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        client.classify(path, "m", top_k=0)


def test_infer_json_request_and_response() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v2/models/cls/versions/1/infer"
        assert HEADER_LENGTH.lower() not in request.headers
        (spec,) = body["inputs"]
        assert spec == {"name": "images", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}
        return httpx.Response(
            200,
            json={
                "model_name": "cls",
                "model_version": "1",
                "id": "r1",
                "outputs": [
                    {"name": "logits", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]},
                    {"name": "ids", "datatype": "INT64", "shape": [2], "data": [4, 5]},
                ],
            },
        )

    client, _ = make_client(handler)
    result = client.infer("cls", {"images": np.array([[0.5, 1.5]], np.float32)}, version=1)
    assert (result.model_name, result.model_version, result.id) == ("cls", "1", "r1")
    np.testing.assert_array_equal(result.outputs["logits"], np.array([[1.0, 2.0, 3.0]], np.float32))
    assert result.outputs["logits"].dtype == np.float32 and result.outputs["ids"].dtype == np.int64


def test_binary_tensor_extension_round_trip() -> None:
    """Large inputs go binary (header length + raw bytes); binary outputs are decoded in order."""
    images = np.random.default_rng(1).standard_normal((64, 1, 16, 16)).astype(np.float32)  # 64 KiB
    tokens = np.array([[1, 2, 3]], np.int64)

    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.headers[HEADER_LENGTH])
        header = json.loads(request.content[:n])
        raw = request.content[n:]
        sizes = [i["parameters"]["binary_data_size"] for i in header["inputs"]]
        assert sizes == [images.nbytes, tokens.nbytes] and all("data" not in i for i in header["inputs"])
        assert header["parameters"] == {"binary_data_output": True}
        got = np.frombuffer(raw[: sizes[0]], np.float32).reshape(images.shape)
        np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(np.frombuffer(raw[sizes[0] :], np.int64), tokens.ravel())
        logits = np.arange(6, dtype=np.float32).reshape(2, 3)
        mask = np.array([True, False])
        words = [b"ab", b""]
        words_raw = b"".join(struct.pack("<I", len(w)) + w for w in words)
        out = {
            "model_name": "m",
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": logits.nbytes},
                },
                {"name": "note", "datatype": "INT32", "shape": [1], "data": [7]},
                {"name": "mask", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}},
                {
                    "name": "words",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(words_raw)},
                },
            ],
        }
        head = json.dumps(out).encode()
        return httpx.Response(
            200,
            content=head + logits.tobytes() + mask.tobytes() + words_raw,
            headers={HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"},
        )

    client, _ = make_client(handler)
    result = client.infer("m", {"images": images, "tokens": tokens})
    np.testing.assert_array_equal(result.outputs["logits"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert result.outputs["note"].tolist() == [7]
    assert result.outputs["mask"].tolist() == [True, False]
    assert result.outputs["words"].tolist() == [b"ab", b""]


def test_named_binary_outputs_and_json_bytes_inputs() -> None:
    specs, chunks = encode_inputs({"text": np.array(["hé"], dtype=object), "x": np.ones(1, np.int32)}, binary=False)
    assert specs == [
        {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}},
        {"name": "x", "shape": [1], "datatype": "INT32", "data": [1]},
    ]
    assert chunks == [struct.pack("<I", 3) + "hé".encode()]
    assert decode_outputs([{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["hé"]}], b"")["t"].tolist() == [
        "hé".encode()
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        header, _ = split_body(request.content, request.headers.get(HEADER_LENGTH))
        assert header["outputs"] == [{"name": "logits", "parameters": {"binary_data": True}}]
        return httpx.Response(200, json={"model_name": "m", "outputs": []})

    client, _ = make_client(handler)
    client.infer("m", {"x": np.zeros(2, np.float32)}, outputs=["logits"], binary=True)
    with pytest.raises(ValueError, match="output 'y': expected 8 binary bytes, got 4"):
        decode_outputs(
            [{"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}], b"1234"
        )


def test_models_metadata_ready_and_generate_parse() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v2/models":
            return httpx.Response(
                200,
                json={"models": [{"name": "a", "versions": [1, 2], "ready": True, "reason": None, "task": "char-lm"}]},
            )
        if path == "/v2/models/a":
            return httpx.Response(
                200,
                json={
                    "name": "a",
                    "versions": ["1"],
                    "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
                    "outputs": [],
                    "parameters": {"task": "image-classification"},
                },
            )
        if path == "/v2/health/ready":
            return httpx.Response(503, json={"error": "warming up"})
        if path == "/v2/models/a/versions/3/ready":
            return httpx.Response(200)
        if path == "/v2/models/a/generate":
            body = json.loads(request.content)
            assert body == {"text_input": "hi", "parameters": {"num_beams": 2, "num_return_sequences": 2}}
            return httpx.Response(
                200,
                json={
                    "model_name": "a",
                    "model_version": 1,
                    "text_output": "yo",
                    "finish_reason": "eos",
                    "score": -0.15,
                    "usage": {"prompt_tokens": 2, "completion_tokens": 4},
                    "sequences": [
                        {
                            "index": 0,
                            "text_output": "yo",
                            "score": -0.15,
                            "num_tokens": 2,
                            "finish_reason": "eos",
                            "tokens": ["y", "o"],
                            "logprobs": [-0.1, -0.2],
                        },
                        {"index": 1, "text_output": "ya", "score": -0.9, "num_tokens": 2},
                    ],
                },
            )
        return httpx.Response(404, json={"error": f"no route {path}"})

    client, sleeps = make_client(handler)
    (info,) = client.models()
    assert (info.name, info.versions, info.ready, info.task) == ("a", ["1", "2"], True, "char-lm")
    meta = client.metadata("a")
    assert meta.inputs[0].shape == [-1, 1, 8, 8] and meta.platform == "onnxruntime_onnx"
    assert meta.parameters["task"] == "image-classification" and meta.raw["platform"] == "onnxruntime_onnx"
    assert client.ready() is False and sleeps == []  # 503 on a readiness probe is an answer, not retried
    assert client.ready("a", version=3) is True
    result = client.generate("a", "hi", num_beams=2, num_return_sequences=2, seed=None)
    assert (result.text, result.model_version, result.finish_reason, result.score) == ("yo", "1", "eos", -0.15)
    assert (result.tokens, result.logprobs, result.num_tokens) == (["y", "o"], [-0.1, -0.2], 2)
    assert [(s.index, s.text, s.score) for s in result.sequences] == [(0, "yo", -0.15), (1, "ya", -0.9)]
    assert result.usage == {"prompt_tokens": 2, "completion_tokens": 4}


# ---- errors and retries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,code,cls",
    [
        (400, None, BadRequestError),
        (413, None, BadRequestError),
        (415, None, BadRequestError),
        (401, "unauthorized", AuthenticationError),
        (403, "forbidden", AuthenticationError),
        (404, None, NotFoundError),
        (429, "overloaded", OverloadedError),
        (429, None, OverloadedError),
        (503, "overloaded", OverloadedError),
        (503, "model_unavailable", ModelUnavailableError),
        (503, None, ModelUnavailableError),
        (504, None, RequestTimeoutError),
        (500, None, ServerError),
    ],
)
def test_error_mapping_carries_status_and_server_message(status: int, code: str | None,
                                                         cls: type[DeepserveError]) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"error": f"went wrong {status}", "code": code})

    client, sleeps = make_client(handler, max_retries=3)
    with pytest.raises(cls) as info:
        client.models()
    assert info.value.status_code == status and info.value.message == f"went wrong {status}"
    retried = cls is OverloadedError  # only overload: a 503 for a model that is not loaded is not retried
    assert len(calls) == (4 if retried else 1) and len(sleeps) == (3 if retried else 0)


def test_retry_after_is_honoured_then_success() -> None:
    answers = [
        httpx.Response(429, json={"error": "queue full"}, headers={"Retry-After": "2"}),
        httpx.Response(503, json={"error": "busy", "code": "overloaded"}, headers={"Retry-After": "1"}),
        httpx.Response(200, json={"models": []}),
    ]
    client, sleeps = make_client(lambda r: answers.pop(0), backoff=0.01)
    assert client.models() == []
    assert sleeps[0] >= 2 and sleeps[1] >= 1 and len(sleeps) == 2


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    client, sleeps = make_client(
        lambda r: httpx.Response(503, json={"error": "x", "code": "overloaded"}), max_retries=6, backoff=1.0,
        max_backoff=8.0
    )
    with pytest.raises(OverloadedError):
        client.models()
    assert len(sleeps) == 6
    for attempt, delay in enumerate(sleeps):
        ceiling = min(8.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(sleeps)) > 1


def test_retry_after_beyond_max_backoff_is_not_waited_for() -> None:
    client, sleeps = make_client(
        lambda r: httpx.Response(429, json={"error": "x"}, headers={"Retry-After": "120"}), max_backoff=30.0
    )
    with pytest.raises(OverloadedError) as info:
        client.models()
    assert sleeps == [] and info.value.retry_after == 120.0


def test_connection_errors_are_retried_timeouts_are_not() -> None:
    attempts: list[str] = []

    def refused(request: httpx.Request) -> httpx.Response:
        attempts.append("c")
        raise httpx.ConnectError("connection refused", request=request)

    client, sleeps = make_client(refused, max_retries=2, backoff=0.01)
    with pytest.raises(APIConnectionError, match="cannot reach the deepserve server at http://test") as info:
        client.models()
    assert len(attempts) == 3 and len(sleeps) == 2 and info.value.status_code is None

    def slow(request: httpx.Request) -> httpx.Response:
        attempts.append("t")
        raise httpx.ReadTimeout("timed out", request=request)

    client, sleeps = make_client(slow)
    with pytest.raises(RequestTimeoutError):
        client.models()
    assert attempts.count("t") == 1 and sleeps == []


def test_settings_are_validated_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0, got -1"):
        Client(max_retries=-1)
    with pytest.raises(ValueError, match="base_url must start with http:// or https://"):
        Client("localhost:8000")
    with pytest.raises(TypeError):
        Client("http://x", "key")  # type: ignore[misc]  # everything but the URL is keyword-only


# ---- streaming ----------------------------------------------------------------------------------------

SSE = (
    b': keep-alive\n\ndata: {"text_output": "he", "index": 1}\n\n'
    b'data: {"text_output": "llo",\ndata: "finish_reason": "length"}\n\ndata: [DONE]\n\n'
)


def test_stream_decodes_events_after_a_retry() -> None:
    answers = [
        httpx.Response(429, json={"error": "full"}, headers={"Retry-After": "0"}),
        httpx.Response(200, content=SSE, headers={"content-type": "text/event-stream"}),
    ]
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answers.pop(0)

    client, sleeps = make_client(handler, backoff=0.01)
    events = list(client.stream("lm", "x", max_new_tokens=4))
    assert [(e.text, e.index, e.finish_reason) for e in events] == [("he", 1, None), ("llo", 0, "length")]
    assert events[0].raw == {"text_output": "he", "index": 1}
    assert requests[-1].url.path == "/v2/models/lm/generate_stream" and len(sleeps) == 1
    assert json.loads(requests[-1].content) == {"text_input": "x", "parameters": {"max_new_tokens": 4}}


def test_stream_error_event_raises() -> None:
    decoder = SSEDecoder()
    with pytest.raises(RequestTimeoutError, match="deadline"):
        list(decoder.events(['data: {"error": "deadline passed", "status": 504}', ""]))
    with pytest.raises(ServerError, match="boom"):
        list(SSEDecoder().events(["event: error", 'data: {"error": "boom"}', ""]))


def test_async_client_same_behaviour() -> None:
    answers = [
        httpx.Response(503, json={"error": "queue full", "code": "overloaded"}, headers={"Retry-After": "1"}),
        httpx.Response(200, json=[{"label": "3", "probability": 1.0}]),
        httpx.Response(404, json={"error": "model 'nope' not found"}),
        httpx.Response(200, content=SSE),
        httpx.Response(200, json={"model_name": "lm", "text_output": "ok"}),
    ]

    async def main() -> None:
        client, sleeps = make_async(lambda r: answers.pop(0), api_key="k")
        async with client:
            preds = await client.classify(b"\x89PNG\r\n\x1a\n...", "m")
            assert preds[0].label == "3" and sleeps and sleeps[0] >= 1
            with pytest.raises(NotFoundError, match="not found"):
                await client.metadata("nope")
            texts = [e.text async for e in client.stream("lm", "x")]
            assert texts == ["he", "llo"]
            assert (await client.generate("lm", "x")).text == "ok"

    asyncio.run(main())
    assert answers == []


def test_package_exports_load_lazily() -> None:
    """``deepserve.clients`` exports every public name, and the CLI module loads neither httpx nor numpy."""
    import subprocess
    import sys

    import deepserve.clients as package

    assert set(package.__all__) == set(package._EXPORTS)
    assert all(getattr(package, name) is not None for name in package.__all__)
    code = "import sys, deepserve.clients.cli; print(sorted({'httpx', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
