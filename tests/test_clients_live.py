"""The SDK and the CLI client against live servers on loopback: the real app (``create_app``) serving tiny
artifacts, and a tiny ASGI app that is overloaded on purpose for the retry tests.

Servers run in a thread on a socket bound before uvicorn starts, so requests simply wait in the listen
backlog until the app (and its lifespan, which loads every model) is up: no readiness polling.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from deepserve.clients import (
    AsyncClient,
    BadRequestError,
    Client,
    GenerateParams,
    NotFoundError,
    OverloadedError,
)

from deepserve.cli import main as cli_main
from tests.artifacts import make_charlm_artifact, make_classifier_artifact

CLASSIFIER, CHARLM = "tiny-cnn", "tiny-charlm"


class LoopbackServer:
    """uvicorn in a thread on a pre-bound 127.0.0.1 socket."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    make_classifier_artifact(repo, CLASSIFIER, formats=("onnx",), quantize=False)
    make_charlm_artifact(repo, CHARLM, formats=("onnx",), quantize=False)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[str]:
    from deepserve.serve.app import create_app

    with LoopbackServer(create_app(repository, device="cpu")) as live:
        yield live.url


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8), dtype=np.uint8)


# ---- sync and async clients against the real app ------------------------------------------------------


def test_sync_client_classification_and_v2(server: str) -> None:
    with Client(server, timeout=30) as client:
        assert client.live() and client.ready() and client.ready(CLASSIFIER) and client.ready(CLASSIFIER, 1)
        index = {m.name: m for m in client.models()}
        assert index[CLASSIFIER].ready and index[CLASSIFIER].versions == ["1"]
        assert index[CLASSIFIER].task == "image-classification" and index[CHARLM].task == "char-lm"

        meta = client.metadata(CLASSIFIER)
        assert meta.name == CLASSIFIER and meta.versions == ["1"] and meta.parameters["task"] == "image-classification"
        assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("images", "FP32", [-1, 1, 8, 8])]
        labels = meta.parameters["labels"]

        preds = client.classify(image(), CLASSIFIER, top_k=3)
        assert len(preds) == 3 and {p.label for p in preds} <= {str(i) for i in range(labels)}
        probs = [p.probability for p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert client.classify(image(), CLASSIFIER, version=1, top_k=3) == preds

        batch = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
        as_json = client.infer(CLASSIFIER, {"images": batch}, binary=False, request_id="abc")
        as_binary = client.infer(CLASSIFIER, {"images": batch}, binary=True, outputs=["logits"])
        assert as_json.id == "abc" and as_json.model_name == CLASSIFIER and as_json.model_version == "1"
        assert as_json.outputs["logits"].shape == (3, labels) and as_json.outputs["logits"].dtype == np.float32
        np.testing.assert_allclose(as_binary.outputs["logits"], as_json.outputs["logits"], rtol=1e-6)
        big = np.random.default_rng(2).standard_normal((300, 1, 8, 8)).astype(np.float32)  # >64 KiB: binary
        assert client.infer(CLASSIFIER, {"images": big}).outputs["logits"].shape == (300, labels)


def test_errors_from_the_real_app(server: str) -> None:
    with Client(server, timeout=30) as client:
        with pytest.raises(NotFoundError) as info:
            client.metadata("no-such-model")
        assert info.value.status_code == 404 and "no-such-model" in info.value.message
        with pytest.raises(NotFoundError):
            client.classify(image(), CLASSIFIER, version=7)
        with pytest.raises(BadRequestError) as bad:
            client.infer(CLASSIFIER, {"pixels": np.zeros((1, 1, 8, 8), np.float32)})
        assert bad.value.status_code == 400 and "pixels" in bad.value.message
        with pytest.raises(BadRequestError) as bad:
            client.classify(b"definitely not an image", CLASSIFIER)
        assert bad.value.status_code in (400, 415)


def test_async_client_against_the_real_app(server: str) -> None:
    async def main() -> None:
        async with AsyncClient(server, timeout=30) as client:
            assert await client.live() and await client.ready(CLASSIFIER)
            assert CLASSIFIER in {m.name for m in await client.models()}
            assert (await client.metadata(CLASSIFIER)).inputs[0].name == "images"
            preds = await asyncio.gather(*(client.classify(image(i), CLASSIFIER, top_k=2) for i in range(4)))
            assert [len(p) for p in preds] == [2, 2, 2, 2]
            result = await client.infer(CLASSIFIER, {"images": np.zeros((2, 1, 8, 8), np.float32)}, binary=True)
            assert result.outputs["logits"].shape[0] == 2
            with pytest.raises(NotFoundError):
                await client.classify(image(), "no-such-model")

    asyncio.run(main())


def test_sync_generation_stream_and_errors(server: str) -> None:
    with Client(server, timeout=30) as client:
        greedy = client.generate(CHARLM, "the ", max_new_tokens=8, temperature=0)
        assert greedy.model_name == CHARLM and greedy.model_version == "1"
        assert greedy.finish_reason in ("eos", "length") and 0 < (greedy.num_tokens or 0) <= 8
        events = list(client.stream(CHARLM, "the ", max_new_tokens=8, temperature=0))
        assert "".join(e.text for e in events) == greedy.text and events[-1].finish_reason == greedy.finish_reason
        assert all(e.raw["model_name"] == CHARLM for e in events)

        sampled = [client.generate(CHARLM, "a", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1) for _ in range(2)]
        assert sampled[0].text == sampled[1].text  # the seed makes sampling reproducible

        scored = client.generate(CHARLM, "a", max_new_tokens=5, temperature=0, logprobs=True)
        assert scored.tokens is not None and scored.logprobs is not None
        assert len(scored.tokens) == len(scored.logprobs) == scored.num_tokens and all(
            lp <= 0 for lp in scored.logprobs
        )
        assert "".join(scored.tokens) == scored.text

        beams = client.generate(CHARLM, "a", max_new_tokens=5, num_beams=3, num_return_sequences=2)
        assert len(beams.sequences) == 2 and beams.text == beams.sequences[0].text
        scores = [seq.score for seq in beams.sequences]
        assert None not in scores and scores == sorted(scores, reverse=True)  # type: ignore[type-var]

        with pytest.raises(BadRequestError, match=r"top_p must be a number in \(0, 1\], got 1.5") as bad:
            client.generate(CHARLM, "a", top_p=1.5)  # the server's bounds, checked before sending
        assert (bad.value.status_code, bad.value.parameter, bad.value.value) == (None, "top_p", 1.5)
        with pytest.raises(BadRequestError, match="max_new_tokens exceeds the server's cap") as cap:
            client.generate(CHARLM, "a", GenerateParams(temperature=0), max_new_tokens=10**6)  # only it knows caps
        assert cap.value.status_code == 400
        with pytest.raises(BadRequestError, match="image-classification"):
            list(client.stream(CLASSIFIER, "a"))
        with pytest.raises(NotFoundError):
            client.generate("no-such-model", "a")


def test_async_generation_and_stream(server: str) -> None:
    async def main() -> None:
        async with AsyncClient(server, timeout=30) as client:
            results = await asyncio.gather(
                *(client.generate(CHARLM, p, max_new_tokens=4, temperature=0) for p in ("a", "b", "c"))
            )
            assert all(r.model_name == CHARLM and r.finish_reason for r in results)
            events = [e async for e in client.stream(CHARLM, "a", version=1, max_new_tokens=4, temperature=0)]
            assert "".join(e.text for e in events) == results[0].text and events[-1].finish_reason
            with pytest.raises(BadRequestError, match="num_beams"):
                await client.generate(CHARLM, "a", num_beams=0)

    asyncio.run(main())


# ---- retries against an overloaded server --------------------------------------------------------------


class Overloaded:
    """ASGI app answering 429 + Retry-After ``busy_for`` times, then 200 with an empty model index."""

    def __init__(self, busy_for: int, retry_after: str = "1") -> None:
        self.busy_for, self.retry_after, self.calls = busy_for, retry_after, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        if self.calls <= self.busy_for:
            status, body = 429, {"error": "queue full"}
            headers = [(b"retry-after", self.retry_after.encode()), (b"content-type", b"application/json")]
        else:
            status, body, headers = 200, {"models": []}, [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def test_retry_after_is_honoured_with_bounded_attempts() -> None:
    app = Overloaded(busy_for=2)
    with LoopbackServer(app) as live, Client(live.url, max_retries=3, backoff=0.01) as client:
        sleeps: list[float] = []
        client._sleep = sleeps.append  # type: ignore[method-assign]  # record instead of waiting
        assert client.models() == []
        assert app.calls == 3 and len(sleeps) == 2 and all(s >= 1.0 for s in sleeps)

    app = Overloaded(busy_for=100)
    with LoopbackServer(app) as live, Client(live.url, max_retries=2, backoff=0.01) as client:
        client._sleep = sleeps.append  # type: ignore[method-assign]
        with pytest.raises(OverloadedError) as info:
            client.models()
        assert app.calls == 3 and info.value.status_code == 429 and info.value.retry_after == 1.0
        assert info.value.message == "queue full"


def test_async_retry_really_waits_for_retry_after_zero() -> None:
    app = Overloaded(busy_for=2, retry_after="0")

    async def main() -> list[Any]:
        async with AsyncClient(live.url, max_retries=2, backoff=0.01) as client:
            return await client.models()

    with LoopbackServer(app) as live:
        assert asyncio.run(main()) == [] and app.calls == 3


# ---- the CLI ---------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models_and_predict_tables_and_json(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPSERVE_URL", server)  # the default --url
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and CLASSIFIER in out and CHARLM in out and "image-classification" in out
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {m["name"]: m for m in json.loads(out)}
    assert code == 0 and rows[CLASSIFIER]["ready"] is True and rows[CHARLM]["task"] == "char-lm"

    from PIL import Image

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image(i)).save(paths[-1])
    code, out, _ = run_cli(capsys, "predict", *map(str, paths), "--model", CLASSIFIER, "--top-k", "2", "--json")
    results = json.loads(out)
    assert code == 0 and [r["image"] for r in results] == list(map(str, paths))
    with Client(server) as client:
        expected = [vars(p) for p in client.classify(paths[0], CLASSIFIER, top_k=2)]
    assert results[0]["predictions"] == expected
    code, out, _ = run_cli(capsys, "predict", str(paths[0]), "--model", CLASSIFIER, "--top-k", "2", "--url", server)
    assert code == 0 and "probability" in out and expected[0]["label"] in out
    assert f"{expected[0]['probability']:.4f}" in out


def test_cli_generate_text_json_and_stream(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("generate", "the ", "--model", CHARLM, "--url", server, "--max-tokens", "6", "--temperature", "0")
    with Client(server) as client:
        expected = client.generate(CHARLM, "the ", max_new_tokens=6, temperature=0)
    code, out, _ = run_cli(capsys, *base, "--json")
    answer = json.loads(out)
    assert code == 0 and answer["text"] == expected.text and answer["finish_reason"] == expected.finish_reason
    code, out, _ = run_cli(capsys, *base)
    assert code == 0 and out.startswith(expected.text) and f"finish: {expected.finish_reason}" in out
    code, out, _ = run_cli(capsys, *base, "--stream")
    assert code == 0 and out.startswith(expected.text) and f"finish: {expected.finish_reason}" in out
    code, out, _ = run_cli(capsys, *base, "--stream", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "".join(e["text_output"] for e in events) == expected.text
    code, out, _ = run_cli(
        capsys,
        "generate",
        "a",
        "--model",
        CHARLM,
        "--url",
        server,
        "--beams",
        "3",
        "--n-best",
        "2",
        "--max-tokens",
        "4",
    )
    assert code == 0 and "2 sequences" in out and "score" in out


def test_cli_clear_errors(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    down = closed_port_url()
    code, out, err = run_cli(capsys, "models", "--url", down, "--retries", "0")
    assert code == 2 and out == ""
    assert f"cannot reach the deepserve server at {down}" in err and "DEEPSERVE_URL" in err
    assert "Traceback" not in err

    img = tmp_path / "x.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")
    code, _, err = run_cli(capsys, "predict", str(img), "--model", "nope", "--url", server)
    assert code == 2 and "nope" in err and CLASSIFIER in err  # the server's message plus what it does have
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "missing.png"), "--model", CLASSIFIER, "--url", server)
    assert code == 2 and "missing.png" in err and "is not a file" in err
    code, _, err = run_cli(capsys, "generate", "hi", "--model", CHARLM, "--beams", "2", "--temperature", "0.5")
    assert code == 2 and "--beams cannot be combined with --temperature" in err
    code, _, err = run_cli(capsys, "models", "--url", "localhost:8000")
    assert code == 2 and "--url must start with http:// or https://" in err
