"""Generation on real exported artifacts (tests/artifacts.py): step runners against the training model,
continuous batching over ONNX Runtime, and the HTTP endpoints (Triton generate, OpenAI SDK) on a live server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from deepserve.manifest import load_manifest
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.step_models import open_step_model
from tests.artifacts import (
    make_charlm_artifact, make_charlm_checkpoint, make_seq2seq_artifact, make_seq2seq_checkpoint,
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen-repo")
    make_charlm_artifact(root, quantize=False)
    make_seq2seq_artifact(root, quantize=False)
    return root


def settings(**kw) -> SimpleNamespace:
    base = dict(max_running_rows=64, max_waiting=256, max_prompt_length=64, max_new_tokens=64, max_beams_x_n=16,
                request_timeout_s=30.0, backend="onnx", precision="fp32")
    return SimpleNamespace(**{**base, **kw})


def torch_model(checkpoint: Path):
    from deepserve.train.checkpoint import load_checkpoint
    from deepserve.train.models import build_model

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["model"]["type"], ckpt["model"]["args"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    return model


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_cached_seq2seq_steps_equal_a_full_rerun_even_left_padded(repo, tmp_path, backend):
    directory = repo / "tiny-seq2seq" / "1"
    step = open_step_model(load_manifest(directory), directory, backend=backend, device="cpu", threads=1)
    ref = torch_model(make_seq2seq_checkpoint(tmp_path / "s.pt", seed=0))
    src_a, src_b = [6, 8, 18, 10, 4], [9, 13]
    tgt_a, tgt_b = [7, 9, 11, 12, 6], [14, 8, 10]
    got_a, got_b = [], []
    tokens = step.join([src_a], [1])  # row a alone for two steps, then b joins (left-padded, other position)
    for t in range(2):
        got_a.append(step.step(tokens)[0])
        tokens = np.asarray([tgt_a[t]])
    tokens = np.concatenate([tokens, step.join([src_b], [1])])
    for t in range(3):
        logits = step.step(tokens)
        got_a.append(logits[0])
        got_b.append(logits[1])
        tokens = np.asarray([tgt_a[2 + t], tgt_b[t]])
    step.reorder(np.asarray([1]))  # a leaves: b continues alone on a trimmed cache
    got_b.append(step.step(tokens[1:])[0])
    with torch.no_grad():
        full_a = ref(torch.tensor([src_a]), torch.tensor([[2] + tgt_a[:4]]))[0].numpy()
        full_b = ref(torch.tensor([src_b]), torch.tensor([[2] + tgt_b]))[0].numpy()
    keep = np.isfinite(np.stack(got_a))  # pad and BOS are suppressed by the runner
    np.testing.assert_allclose(np.stack(got_a)[keep], full_a[keep], atol=1e-4)
    np.testing.assert_allclose(np.stack(got_b)[np.isfinite(np.stack(got_b))], full_b[np.isfinite(np.stack(got_b))],
                               atol=1e-4)


def test_cached_charlm_steps_equal_a_full_rerun(repo, tmp_path):
    directory = repo / "tiny-charlm" / "1"
    step = open_step_model(load_manifest(directory), directory, backend="onnx", device="cpu", threads=1)
    ref = torch_model(make_charlm_checkpoint(tmp_path / "c.pt", seed=0))
    seq = [9, 10, 3, 12, 15, 1, 20]
    tokens = step.join([seq[:3]], [1])  # prefill two tokens, then feed one at a time
    got = []
    for t in seq[3:]:
        got.append(step.step(tokens)[0])
        tokens = np.asarray([t])
    with torch.no_grad():
        full, _ = ref(torch.tensor([seq]), ref.init_state(1))
    np.testing.assert_allclose(np.stack(got), full[0, 2:-1].numpy(), atol=1e-4)


def test_seq2seq_batching_does_not_change_greedy_or_beam(repo):
    directory = repo / "tiny-seq2seq" / "1"
    probes = [("12+7", {"temperature": 0, "max_new_tokens": 12}),
              ("(3+4)*2", {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 10}),
              ("99-5", {"num_beams": 3, "max_new_tokens": 8, "length_penalty": 0.5, "early_stopping": True})]

    async def main():
        s = GenerationServable(load_manifest(directory), directory, settings(max_running_rows=128), "cpu")
        await s.start()
        await s.warmup()
        try:
            alone = [await s.generate(t, p) for t, p in probes]
            crowd = [s.generate(f"{i}*{i + 3}" * (1 + i % 3), [{"temperature": 0, "max_new_tokens": 4 + i % 9},
                                                                {"num_beams": 4, "max_new_tokens": 6},
                                                                {"seed": i, "max_new_tokens": 7}][i % 3])
                     for i in range(29)]
            together = await asyncio.gather(*[s.generate(t, p) for t, p in probes], *crowd)
            return alone, together[:3]
        finally:
            await s.stop()

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together):
        assert [(o.token_ids, o.finish_reason) for o in a.outputs] == [(o.token_ids, o.finish_reason) for o in b.outputs]
        np.testing.assert_allclose([o.score or 0 for o in a.outputs], [o.score or 0 for o in b.outputs], atol=1e-4)


# ---------------------------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server(repo):
    import uvicorn

    from deepserve.serve.app import create_app

    app = create_app(repo, settings={"max_new_tokens": 4000, "max_beams_x_n": 8, "backend": "onnx"}, device="cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # test fixture only: wait for uvicorn's startup (models load in its lifespan)
    assert srv.started, "server did not start"
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app)
    srv.should_exit = True
    thread.join(30)


def sse_events(response: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_triton_generate_and_stream(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        body = {"text_input": "12+7", "parameters": {"temperature": 0, "max_new_tokens": 8}}
        r = c.post("/v2/models/tiny-seq2seq/generate", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_name"] == "tiny-seq2seq" and out["model_version"] == "1"
        assert out["finish_reason"] in ("length", "eos")
        with c.stream("POST", "/v2/models/tiny-seq2seq/versions/1/generate_stream", json=body) as s:
            events = sse_events(s)
        assert "".join(e["text_output"] for e in events) == out["text_output"]
        assert events[-1]["finish_reason"] == out["finish_reason"]
        beam = {"text_input": "hello there", "parameters": {"num_beams": 3, "num_return_sequences": 2,
                                                            "max_new_tokens": 10}}
        r = c.post("/v2/models/tiny-charlm/generate", json=beam).json()
        assert len(r["sequences"]) == 2 and r["sequences"][0]["score"] >= r["sequences"][1]["score"]
        with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=beam) as s:
            events = sse_events(s)
        assert "".join(e["text_output"] for e in events if e["index"] == 0) == r["text_output"]
        # client errors name the field; unknown models are 404; bytes that are not UTF-8 are not a crash
        bad = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "a", "parameters": {"top_p": 2}})
        assert bad.status_code == 400 and bad.json()["error"].startswith("top_p")
        cap = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "a", "parameters": {"num_beams": 9}})
        assert cap.status_code == 400 and "max_beams_x_n" in cap.json()["error"]
        long = c.post("/v2/models/tiny-seq2seq/generate", json={"text_input": "1" * 100})
        assert long.status_code == 400 and long.json()["error"].startswith("prompt")
        assert c.post("/v2/models/nope/generate", json={"text_input": "a"}).status_code == 404
        raw = c.post("/v2/models/tiny-charlm/generate", content=b'{"text_input": "ab\xff\xfecd", "parameters": '
                                                                   b'{"temperature": 0, "max_new_tokens": 3}}')
        assert raw.status_code == 200 and raw.json()["usage"]["prompt_tokens"] == 6


def test_openai_sdk_sync_and_stream(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"tiny-charlm", "tiny-seq2seq"}
    done = client.completions.create(model="tiny-charlm", prompt="the ", max_tokens=12, temperature=0)
    assert len(done.choices) == 1 and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny-charlm", prompt="the ", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    beams = client.completions.create(model="tiny-seq2seq", prompt="12+7", max_tokens=8, n=2,
                                      extra_body={"use_beam_search": True, "length_penalty": 0.8})
    assert sorted(c.index for c in beams.choices) == [0, 1]
    sampled = client.completions.create(model="tiny-charlm", prompt="a", max_tokens=6, n=3, seed=5, logprobs=2,
                                        stop=["zz"], extra_body={"top_k": 5})
    again = client.completions.create(model="tiny-charlm", prompt="a", max_tokens=6, n=3, seed=5, logprobs=2,
                                      stop=["zz"], extra_body={"top_k": 5})
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert all(len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) for c in sampled.choices)
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model="tiny-charlm", prompt="a", max_tokens=5000)
    assert err.value.response.json()["error"].startswith("max_tokens")


def test_a_client_that_disconnects_frees_its_rows(server):
    servable = server.app.state.repository.get("tiny-charlm")
    steps_before = servable.scheduler.steps
    body = {"text_input": "a", "parameters": {"max_new_tokens": 4000, "seed": 1}}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    break  # one token arrived: hang up
    assert servable.scheduler.wait_rows(0, 20.0)
    assert servable.scheduler.steps - steps_before < 3900  # stopped long before its 4000 tokens
