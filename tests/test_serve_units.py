"""Serving pieces without a model: settings, image preprocessing, the v2 tensor codec."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from deepserve.serve.errors import BadRequest, UnsupportedMediaType
from deepserve.serve.preprocess import ImagePreprocessor
from deepserve.serve.settings import ModelSettings, SettingsError, env_overrides, resolve_settings
from deepserve.serve.v2 import decode_request, encode_response

# ------------------------------------------------------------------------------------------------- settings


def test_settings_layers_defaults_file_then_overrides(tmp_path):
    assert ModelSettings().max_batch_size == 32 and ModelSettings().default_version is None
    (tmp_path / "config.json").write_text(json.dumps({"max_batch_size": 8, "backend": "torchscript",
                                                      "default_version": 2}))
    s = resolve_settings(tmp_path, {"max_batch_size": 4, "max_queue_delay_ms": None})
    assert (s.max_batch_size, s.backend, s.default_version, s.max_queue_delay_ms) == (4, "torchscript", 2, 2.0)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.yaml").write_text("instances: 2\nmax_queue_delay_ms: 5\n")
    s = resolve_settings(tmp_path, {})
    assert s.instances == 2 and s.max_queue_delay_ms == 5.0


def test_settings_env_overrides_are_typed():
    env = {"DEEPSERVE_MAX_BATCH_SIZE": "16", "DEEPSERVE_MAX_QUEUE_DELAY_MS": "0.5", "DEEPSERVE_DEFAULT_VERSION": "3",
           "UNRELATED": "x"}
    assert env_overrides(env) == {"max_batch_size": 16, "max_queue_delay_ms": 0.5, "default_version": 3}
    with pytest.raises(SettingsError, match="DEEPSERVE_INSTANCES.*'two'"):
        env_overrides({"DEEPSERVE_INSTANCES": "two"})


@pytest.mark.parametrize("bad, field", [
    ({"max_batch_size": 0}, "max_batch_size"), ({"backend": "tensorrt"}, "backend"),
    ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"), ({"default_version": 0}, "default_version"),
    ({"precision": "int4"}, "precision"), ({"request_timeout_s": 0}, "request_timeout_s"),
])
def test_settings_validation_names_field_and_value(bad, field):
    with pytest.raises(SettingsError, match=field) as err:
        ModelSettings(**bad)
    assert repr(next(iter(bad.values()))) in str(err.value)


def test_settings_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"max_batch_sise": 4}')
    with pytest.raises(SettingsError, match=r"config\.json.*max_batch_sise"):
        resolve_settings(tmp_path, {})
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(SettingsError, match=r"config\.json: cannot parse"):
        resolve_settings(tmp_path, {})


# ------------------------------------------------------------------------------------------------- preprocess


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


RGB = ImagePreprocessor(3, 4, 6, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "nearest", "RGB")
GRAY = ImagePreprocessor(1, 4, 4, (0.5,), (0.5,), "bilinear", "L", max_pixels=10_000)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "WEBP"])
def test_lossless_formats_decode_convert_and_normalise_exactly(fmt):
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1] = 255, 64
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = RGB(encode(pixels, fmt, **kw))
    assert out.shape == (3, 4, 6) and out.dtype == np.float32
    expected = [(1.0 - 0.5) / 0.5, (64 / 255 - 0.25) / 0.25, 0.0]
    np.testing.assert_allclose(out.mean(axis=(1, 2)), expected, atol=1e-5)


def test_jpeg_rgb_to_gray_and_resize():
    pixels = np.full((32, 16, 3), 255, dtype=np.uint8)
    out = GRAY(encode(pixels, "JPEG", quality=95))
    assert out.shape == (1, 4, 4)
    np.testing.assert_allclose(out, 1.0, atol=0.02)  # white -> (1 - 0.5) / 0.5


def test_transparent_pixels_become_white():
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    out = GRAY(encode(pixels, "PNG"))
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_bad_images_are_client_errors_naming_the_problem():
    png = encode(np.zeros((8, 8), dtype=np.uint8), "PNG")
    with pytest.raises(BadRequest, match="not a decodable image"):
        GRAY(b"definitely not an image")
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        GRAY(encode(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), "PNG")[:-200])
    with pytest.raises(BadRequest, match="decompression bomb.*200x200"):
        GRAY(encode(np.zeros((200, 200), dtype=np.uint8), "PNG"))
    with pytest.raises(UnsupportedMediaType, match="TIFF"):
        GRAY(encode(np.zeros((8, 8), dtype=np.uint8), "TIFF"))
    with pytest.raises(BadRequest, match="empty"):
        GRAY(b"")
    assert GRAY(png).shape == (1, 4, 4)


def test_preprocessor_from_manifest_rejects_inconsistent_specs():
    base = {"channels": 1, "height": 8, "width": 8, "mean": [0.5], "std": [0.5], "resize": "bilinear"}
    assert ImagePreprocessor.from_manifest(base).color_mode == "L"
    with pytest.raises(ValueError, match="resize"):
        ImagePreprocessor.from_manifest({**base, "resize": "magic"})
    with pytest.raises(ValueError, match="color_mode"):
        ImagePreprocessor.from_manifest({**base, "color_mode": "RGB"})


def reference_pixels(pre: ImagePreprocessor, data: bytes) -> np.ndarray:
    """The float formula the lookup table stands for: convert and resize as Pillow does, then per channel
    float32(x) * scale + offset."""
    image = Image.open(io.BytesIO(data))
    if image.mode != pre.color_mode:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255,) * 4), image.convert("RGBA"))
        image = image.convert(pre.color_mode)
    if image.size != (pre.width, pre.height):
        image = image.resize((pre.width, pre.height), resample=Image.Resampling[pre.resize.upper()])
    std = np.asarray(pre.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-np.asarray(pre.mean, dtype=np.float32) / std).astype(np.float32)
    pixels = np.asarray(image, dtype=np.float32).reshape(pre.height, pre.width, pre.channels)
    return np.ascontiguousarray((pixels * scale + offset).transpose(2, 0, 1))


def test_preprocessing_equals_the_float_formula_bit_for_bit():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # a transparent row, composited over white
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    images = {
        "L": encode(rgba[..., 0], "PNG"), "RGB": encode(rgba[..., :3], "PNG"), "RGBA": encode(rgba, "PNG"),
        "LA": encode(np.ascontiguousarray(rgba[..., ::3]), "PNG"), "RGB 5x7": encode(rgba[:7, :5, :3], "PNG"),
        "JPEG 20x12": encode(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "JPEG"),
    }
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=int(palette.getpixel((0, 0))))
    images["P+transparency"] = buf.getvalue()
    preprocessors = [
        ImagePreprocessor(1, 8, 8, (0.5,), (0.25,), "bilinear", "L"),  # L as is, RGB(A) converted
        ImagePreprocessor(3, 8, 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", "RGB"),
        ImagePreprocessor(1, 6, 5, (0.1307,), (0.3081,), "bicubic", "L"),  # resized
        ImagePreprocessor(3, 4, 6, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "nearest", "RGB"),
    ]
    for pre in preprocessors:
        for name, data in images.items():
            out, expected = pre(data), reference_pixels(pre, data)
            assert out.dtype == np.float32 and out.flags.c_contiguous, name
            np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32), err_msg=name)


def test_unsupported_formats_are_named_whichever_plugins_pillow_loaded_first():
    Image.init()  # every plugin registered: Image.open alone would also try TGA, IPTC, ... on each image
    jpeg = encode(np.zeros((8, 8, 3), dtype=np.uint8), "JPEG")
    assert GRAY.open(jpeg).format == "JPEG" and RGB.open(encode(np.zeros((4, 6, 3), np.uint8), "WEBP")).format == "WEBP"
    for fmt in ("TIFF", "PPM", "ICO"):
        with pytest.raises(UnsupportedMediaType, match=f"image format {fmt} is not supported"):
            GRAY.open(encode(np.zeros((8, 8), dtype=np.uint8), fmt))


# ----------------------------------------------------------------------------------------- top-k labels


def reference_top_k(logits: np.ndarray, labels: list[str], k: int) -> list[list[tuple[str, float]]]:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(labels[i] if i < len(labels) else str(i), float(row[i])) for i in idx] for row, idx in zip(probs, order)]


@pytest.mark.parametrize("shape", [(1, 10), (3, 7), (1, 100), (2, 3000)])  # Python floats / argsort / argpartition
def test_top_k_labels_follow_the_stable_softmax_order(shape):
    from deepserve.serve.classifier import top_k_labels

    rng = np.random.default_rng(4)
    labels = [f"c{i}" for i in range(shape[1] - 1)]  # the last class has no label: its index stands in
    cases = [
        rng.standard_normal(shape).astype(np.float32),
        rng.integers(-2, 2, shape).astype(np.float32),  # ties everywhere, also at the k-th place
        (rng.standard_normal(shape) * 1e3).astype(np.float32),  # most probabilities underflow to 0: tied
        np.full(shape, np.nan, dtype=np.float32),
    ]
    cases[0][0, -1] = cases[0].max() + 1  # the unlabelled class on top
    for logits in cases:
        for k in (1, 5, shape[1], shape[1] + 3):
            got = top_k_labels(logits, labels, k)
            want = reference_top_k(logits, labels, k)
            assert [[p["label"] for p in row] for row in got] == [[lab for lab, _ in row] for row in want]
            for row, want_row in zip(got, want):
                assert all(type(p["probability"]) is float for p in row)
                np.testing.assert_allclose([p["probability"] for p in row], [p for _, p in want_row], rtol=1e-12)
    assert top_k_labels(cases[0], labels, 1)[0][0]["label"] == str(shape[1] - 1)
    full = top_k_labels(cases[0], labels, shape[1])
    assert all(abs(sum(p["probability"] for p in row) - 1) < 1e-9 for row in full)


# ------------------------------------------------------------------------------------------------- v2 codec


def test_decode_json_and_binary_tensors():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    header, inputs = decode_request(json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [3, 4], "data": x.ravel().tolist()},
        {"name": "b", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"\x00img").decode()]},
    ]}).encode(), None)
    np.testing.assert_array_equal(inputs["a"], x)
    assert inputs["b"].tolist() == [b"\x00img"]

    head = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [3, 4], "parameters": {"binary_data_size": 48}},
        {"name": "b", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 13}},
    ]}).encode()
    blob = x.tobytes() + struct.pack("<I", 5) + b"hello" + struct.pack("<I", 0)
    _, inputs = decode_request(head + blob, str(len(head)))
    np.testing.assert_array_equal(inputs["a"], x)
    assert inputs["b"].tolist() == [b"hello", b""]


_BINARY_HEAD = b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}'


@pytest.mark.parametrize("body, header, message", [
    (b"{not json", None, "malformed JSON"),
    (b'{"inputs": []}', None, "non-empty"),
    (b'{"inputs": [{"name": "a", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, "datatype"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1]}]}', None, "1 values for shape"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "shape"),
    (b'{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["@@"]}]}', None, "base64"),
    (_BINARY_HEAD + b"xx", str(len(_BINARY_HEAD)), "runs past"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}', "999", "does not fit"),
])
def test_decode_errors_are_bad_requests(body, header, message):
    with pytest.raises(BadRequest, match=message):
        decode_request(body, header)


def test_encode_binary_and_classification_outputs():
    logits = np.array([[0.1, 2.0, -1.0]], dtype=np.float32)
    request = {"id": "7", "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                      {"name": "logits", "parameters": {"classification": 2}}]}
    response = encode_response(request, {"logits": logits}, "m", "1", ["a", "b", "c"])
    n = int(response.headers["inference-header-content-length"])
    header = json.loads(response.body[:n])
    assert header["id"] == "7" and header["outputs"][0]["parameters"] == {"binary_data_size": 12}
    np.testing.assert_array_equal(np.frombuffer(response.body[n:], np.float32), logits.ravel())
    assert header["outputs"][1]["data"] == ["2.000000:1:b", "0.100000:0:a"]
    with pytest.raises(BadRequest, match="unknown output 'probs'"):
        encode_response({"outputs": [{"name": "probs"}]}, {"logits": logits}, "m", "1", [])


# ------------------------------------------------------------------------------- server stack and routes


def test_server_implementations_prefer_the_standard_extras_and_fall_back(monkeypatch):
    import importlib.util

    from deepserve.serve import cli

    assert cli.server_implementations("asyncio", "h11") == {"loop": "asyncio", "http": "h11"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # uvicorn[standard]
    assert cli.server_implementations() == {"loop": "uvloop", "http": "httptools"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # uvicorn without [standard]
    assert cli.server_implementations() == {"loop": "asyncio", "http": "h11"}
    with pytest.raises(cli.ServerOptionError, match=r"--loop uvloop: uvloop is not installed.*--loop asyncio"):
        cli.server_implementations("uvloop", "auto")
    with pytest.raises(cli.ServerOptionError, match=r"--http httptools"):
        cli.server_implementations("auto", "httptools")


def test_direct_routes_take_only_the_request_and_str_path_parameters():
    from fastapi import Request

    from deepserve.serve.http_util import DirectRoute

    async def good(request: Request, model: str): ...

    async def with_query(request: Request, model: str, top_k: int = 5): ...

    async def without_request(model: str): ...

    DirectRoute("/m/{model}", good)
    with pytest.raises(TypeError, match="'top_k' is not a str path parameter"):
        DirectRoute("/m/{model}", with_query)
    with pytest.raises(TypeError, match="takes request first"):
        DirectRoute("/m/{model}", without_request)


def test_a_hot_route_reads_the_body_again_after_read_body():
    """read_body drains the ASGI channel; the endpoint's request keeps the bytes, so body() and json() after it
    answer at once instead of waiting on a channel that has nothing more until the client leaves."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from deepserve.serve.http_util import DirectRoute, HotPath, read_body

    body, seen = b'{"x": 1}', {}

    async def endpoint(request: Request, model: str):
        seen.update(read=await read_body(request), again=await request.body(), json=await request.json())
        return JSONResponse({"model": model})

    async def run() -> list[dict]:
        messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # a live connection: nothing more until the client leaves

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/m/a", "root_path": "", "query_string": b"",
                 "headers": [(b"content-length", str(len(body)).encode())], "app": FastAPI()}
        hot = HotPath([DirectRoute("/m/{model}", endpoint, methods=["POST"])], lambda *args: None)
        assert await asyncio.wait_for(hot(scope, receive, send), 30)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"model":"a"}'
    assert seen == {"read": body, "again": body, "json": {"x": 1}}


def test_small_images_are_decoded_without_a_thread_hop(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from deepserve.serve import classifier

    hops = []
    real_pool = classifier.preprocess_pool

    def counting_pool():
        hops.append(1)
        return real_pool()

    monkeypatch.setattr(classifier, "preprocess_pool", counting_pool)
    pre = ImagePreprocessor(1, 8, 8, (0.5,), (0.25,), color_mode="L")
    servable = SimpleNamespace(preprocessor=pre)

    def png_of(size: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (size, size), 128).save(buf, "PNG")
        return buf.getvalue()

    decode = classifier.ClassificationServable.decode_images
    small = asyncio.run(decode(servable, [png_of(8), png_of(32)]))
    assert small.shape == (2, 1, 8, 8) and hops == []
    big = asyncio.run(decode(servable, [png_of(100)]))
    assert big.shape == (1, 1, 8, 8) and hops == [1]
    np.testing.assert_allclose(big, small[:1], atol=1e-6)  # a flat grey image resizes to itself


def test_device_resolution_asks_the_driver_and_agrees_with_torch():
    """`--device auto` counts GPUs through the CUDA driver (no torch import); torch must see the same."""
    import torch

    from deepserve.serve.backends import BackendUnavailable, cuda_device_count, resolve_device

    assert cuda_device_count() == torch.cuda.device_count()
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(BackendUnavailable, match="device must be auto, cpu or cuda"):
        resolve_device("tpu")


def test_torchscript_cpu_fast_path_takes_linear_graphs_and_leaves_convolutions():
    import torch

    from deepserve.serve import runtime

    def frozen(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
        return torch.jit.freeze(torch.jit.trace(module.eval(), example))

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    x, image = torch.randn(3, 8), torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        fast = runtime._cpu_fast_path(torch, frozen(mlp, x))
        assert not isinstance(fast, torch.jit.ScriptModule)  # Static Runtime
        assert torch.allclose(fast(x), mlp(x), atol=1e-6)
        kept = frozen(conv, image)
        assert runtime._cpu_fast_path(torch, kept) is kept


def test_torchscript_cpu_fast_path_stores_transposed_frozen_weights_contiguous():
    """The seq2seq step's ``addmm(b, x, weight.t())`` freezes a transposed view; the fast path lays it out
    row-major (the layout MKL reads fastest) without changing the answer."""
    import torch

    from deepserve.serve import runtime
    from deepserve.train.models.seq2seq import affine

    class Rows(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return affine(x, self.fc)

    def weights(graph) -> list:
        return [n.output().toIValue() for n in graph.findAllNodes("prim::Constant")
                if n.output().type().kind() == "TensorType" and n.output().toIValue().dim() == 2]

    torch.manual_seed(0)
    rows, x = Rows().eval(), torch.randn(3, 8)
    with torch.no_grad():
        module = torch.jit.freeze(torch.jit.trace(rows, x))
        assert [w.is_contiguous() for w in weights(module.graph)] == [False]  # as traced and frozen
        runtime._contiguous_constants(module.graph)
        assert [w.is_contiguous() for w in weights(module.graph)] == [True]
        assert torch.equal(module(x), rows(x))
        assert torch.equal(runtime._cpu_fast_path(torch, module)(x), rows(x))


def test_a_stopped_listener_completes_no_new_handshake_but_keeps_its_queue():
    """What a drain relies on to reset nothing: after ``stop_new_connections`` a new client's connect goes
    unanswered, while the connection already queued is still there to accept."""
    import socket

    from deepserve.serve.shutdown import stop_new_connections

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as queued:
            queued.sendall(b"GET / HTTP/1.1\r\n\r\n")
            stop_new_connections(listener)
            with socket.socket() as late:
                late.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    late.connect(("127.0.0.1", port))
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                assert conn.recv(64) == b"GET / HTTP/1.1\r\n\r\n"


class _FixedCostRuntime:
    """A graph runtime whose batch costs the same whatever its rows (a tiny model's per-call overhead), noting the
    thread each batch ran on. The cost is charged to ``clock`` (the ``time.perf_counter`` the batcher times batches
    with), not slept, so the batcher's estimate is the same on any machine."""

    platform = "fixed-cost"
    inline_safe = True
    BATCH_S = 0.004

    def __init__(self, clock: _ManualClock | None = None) -> None:
        self.threads: list[int] = []
        self.clock = clock

    def run(self, inputs):
        if self.clock is not None:
            self.clock.advance(self.BATCH_S)
        self.threads.append(threading.get_ident())
        return {"logits": np.zeros((len(inputs["images"]), 10), np.float32)}


class _ManualClock:
    """A ``time.perf_counter`` that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _servable(tmp_path, runtime_factory, **settings):
    from deepserve.manifest import load_manifest
    from deepserve.serve.classifier import ClassificationServable
    from tests.artifacts import make_classifier_artifact

    directory = make_classifier_artifact(tmp_path, "tiny", quantize=False)
    return ClassificationServable(load_manifest(directory), directory, ModelSettings(**settings), "cpu",
                                  runtime_factory=runtime_factory)


def test_after_warmup_the_first_burst_runs_its_full_batches_where_later_bursts_do(tmp_path, monkeypatch):
    """Warm-up must leave the batcher's cost per row at a full batch's, not a one-row batch's: a batch costs 4 ms
    whatever its rows, so 32 rows cost ~0.13 ms each (inline, under 60 ms a batch) and one row 4 ms (128 ms for
    32 rows: the worker thread). The queue-wait bound is off so that a one-row estimate shows where the batch
    runs rather than refusing the burst."""
    import asyncio

    clock = _ManualClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    runtime = _FixedCostRuntime(clock)
    servable = _servable(tmp_path, lambda *a: runtime, inline_batch_ms=60.0, max_queue_wait_ms=0)

    async def first_burst() -> list[int]:
        await servable.start()
        try:
            await servable.warmup()
            runtime.threads.clear()
            x = np.zeros((1, 1, 8, 8), np.float32)
            await asyncio.gather(*(servable.infer({"images": x}) for _ in range(32)))
            return runtime.threads
        finally:
            await servable.stop()

    loop_thread = threading.get_ident()
    threads = asyncio.run(first_burst())
    assert threads and set(threads) == {loop_thread}


def test_intra_op_threads_sets_the_threads_each_instance_runs_on(tmp_path):
    import asyncio

    from deepserve.serve.backends import cpu_threads

    seen = []

    def factory(graph, directory, settings, device, threads):
        seen.append(threads)
        return _FixedCostRuntime()

    chosen = cpu_threads(1) + 1  # not what the default gives on any machine
    for settings in ({"intra_op_threads": chosen}, {}):
        servable = _servable(tmp_path / str(len(seen)), factory, **settings)

        async def start_stop() -> None:
            await servable.start()
            await servable.stop()

        asyncio.run(start_stop())
    assert seen == [chosen, cpu_threads(1)]
    assert env_overrides({"DEEPSERVE_INTRA_OP_THREADS": "2"}) == {"intra_op_threads": 2}
    with pytest.raises(SettingsError, match="DEEPSERVE_INTRA_OP_THREADS: intra_op_threads must be a number"):
        env_overrides({"DEEPSERVE_INTRA_OP_THREADS": "latest"})
    assert env_overrides({"DEEPSERVE_DEFAULT_VERSION": "latest"}) == {"default_version": None}
    with pytest.raises(SettingsError, match="intra_op_threads must be an integer >= 1, got 0"):
        ModelSettings(intra_op_threads=0)


def test_a_model_declaring_a_scalar_input_refuses_a_scalar_with_a_400(tmp_path):
    """A manifest may declare an input of shape [] (no batch dimension): a 0-d tensor sent to it is a bad request
    naming the shape, not an IndexError (a 500)."""
    import asyncio

    from deepserve.manifest import load_manifest
    from deepserve.serve.classifier import ClassificationServable
    from tests.artifacts import make_classifier_artifact

    directory = make_classifier_artifact(tmp_path, "scalar", quantize=False)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["graphs"]["model"]["inputs"][0]["shape"] = []
    (directory / "manifest.json").write_text(json.dumps(manifest))
    servable = ClassificationServable(load_manifest(directory), directory, ModelSettings(), "cpu")
    with pytest.raises(BadRequest, match=r"shape \[\] does not match"):
        asyncio.run(servable.infer({"images": np.array(1.0, np.float32)}))
