"""Generation on real exported artifacts (tests/artifacts.py): step runners against the training model,
continuous batching over ONNX Runtime, and the HTTP endpoints (Triton generate, OpenAI SDK) on a live server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    concat_era_copy, make_charlm_artifact, make_charlm_checkpoint, make_seq2seq_artifact, make_seq2seq_checkpoint,
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


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_cached_seq2seq_steps_stay_exact_as_the_cache_grows(repo, tmp_path, backend):
    """40 steps cross two growths of the slot caches (SLOTS = 16 at a time), with a row joining late (left
    padding), beam-style row moves and a row leaving: every step still equals the model's full forward."""
    directory = repo / "tiny-seq2seq" / "1"
    step = open_step_model(load_manifest(directory), directory, backend=backend, device="cpu", threads=1)
    ref = torch_model(make_seq2seq_checkpoint(tmp_path / "s.pt", seed=0))
    srcs = [[6, 8, 18, 10, 4], [9, 13]]
    tgts = [[int(t) for t in np.random.default_rng(i).integers(4, 20, 40)] for i in range(2)]
    got: list[list[np.ndarray]] = [[], []]
    tokens = step.join([srcs[0]], [1])
    for t in range(40):
        if t == 3:  # row 1 joins and then follows row 0's source for a few steps as two beams would
            tokens = np.concatenate([tokens, step.join([srcs[1]], [1])])
        logits = step.step(tokens)
        for r, i in enumerate([0, 1][: len(tokens)] if t < 36 else [1]):
            got[i].append(logits[r])
        tokens = np.asarray([tgts[i][len(got[i]) - 1] for i in ([0, 1][: len(tokens)] if t < 35 else [1])])
        if t == 20:  # rows swap places and swap back: a move that copies both rows
            step.reorder(np.asarray([1, 0]), regroup=False)
            step.reorder(np.asarray([1, 0]), regroup=False)
        if t == 35:
            step.reorder(np.asarray([1]))  # row 0 leaves
    assert step.past_pad.shape[1] > step.fill > 32  # the caches grew past two rounds of SLOTS
    for i in range(2):
        with torch.no_grad():
            full = ref(torch.tensor([srcs[i]]), torch.tensor([[2] + tgts[i][: len(got[i]) - 1]]))[0].numpy()
        keep = np.isfinite(np.stack(got[i]))
        np.testing.assert_allclose(np.stack(got[i])[keep], full[keep], atol=1e-4)


def without_prefill(directory: Path, into: Path) -> Path:
    """A copy of a char-LM artifact as exported before the ``prefill`` graph: ``step`` only."""
    import shutil

    shutil.copytree(directory, into)
    manifest = load_manifest(into)
    spec = manifest.graphs.pop("prefill")
    for name in spec.files.values():
        (into / name).unlink()
        manifest.files.pop(name)
    manifest.save(into)
    return into


@pytest.mark.parametrize("graphs", ["step+prefill", "step only"])
def test_cached_charlm_steps_equal_a_full_rerun(repo, tmp_path, graphs):
    directory = repo / "tiny-charlm" / "1"
    if graphs == "step only":
        directory = without_prefill(directory, tmp_path / "old")
    step = open_step_model(load_manifest(directory), directory, backend="onnx", device="cpu", threads=1)
    assert step.last_only == (graphs == "step+prefill")  # the prefill graph serves single steps too
    ref = torch_model(make_charlm_checkpoint(tmp_path / "c.pt", seed=0))
    seq = [9, 10, 3, 12, 15, 1, 20]
    tokens = step.join([seq[:3]], [1])  # prefill two tokens, then feed one at a time
    tokens = np.concatenate([tokens, step.join([seq[:5], seq[:1]], [2, 1])])  # other lengths, copies, no prefill
    got, others = [], []
    for t in seq[3:]:
        logits = step.step(tokens)
        got.append(logits[0])
        others.append(logits[1:])
        tokens = np.asarray([t, 0, 0, 0])
    with torch.no_grad():
        full, _ = ref(torch.tensor([seq]), ref.init_state(1))
        five, _ = ref(torch.tensor([seq[:5]]), ref.init_state(1))
        one, _ = ref(torch.tensor([seq[:1]]), ref.init_state(1))
    np.testing.assert_allclose(np.stack(got), full[0, 2:-1].numpy(), atol=1e-4)
    np.testing.assert_allclose(others[0], torch.cat([five[:, -1]] * 2 + [one[:, -1]]).numpy(), atol=1e-4)


def test_a_prefill_graph_that_breaks_the_contract_is_refused_by_name(repo):
    from deepserve.manifest import CharLMGraphContract, ManifestError

    manifest = load_manifest(repo / "tiny-charlm" / "1")
    assert CharLMGraphContract.of(manifest).prefill
    manifest.graphs["prefill"] = manifest.graphs["step"]  # logits [B,T,V]: every position, not the last
    with pytest.raises(ManifestError, match="graph prefill must .* logits \\[batch, vocab\\]"):
        CharLMGraphContract.of(manifest)


def test_a_charlm_artifact_without_prefill_serves_the_same_text(repo, tmp_path):
    new = repo / "tiny-charlm" / "1"
    old = without_prefill(new, tmp_path / "old")

    async def answers(directory: Path) -> list[str]:
        s = GenerationServable(load_manifest(directory), directory, settings(), "cpu")
        await s.start()
        await s.warmup()
        try:
            results = await asyncio.gather(*(s.generate(text, {"temperature": 0, "max_new_tokens": 6})
                                              for text in ("ab", "hello", "a", "hello")))
            return [r.outputs[0].text for r in results]
        finally:
            await s.stop()

    assert "prefill" not in load_manifest(old).graphs
    texts = asyncio.run(answers(old))
    assert texts == asyncio.run(answers(new)) and all(len(t) == 6 for t in texts)


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_chunked_prefill_gives_the_tokens_of_whole_prompts(repo, backend):
    """Prompts prefilled a few tokens per iteration (staged at different times, sharing calls) give exactly the
    tokens of prompts prefilled whole, greedy and seeded sampling alike."""
    directory = repo / "tiny-charlm" / "1"
    prompts = ["hello there", "ab", "a", "the quick brown fox jumps", "hello there"]
    params = [{"temperature": 0, "max_new_tokens": 8}, {"temperature": 0.9, "top_k": 5, "seed": 3, "max_new_tokens": 8}]

    async def answers(budget: int) -> list[list[int]]:
        s = GenerationServable(load_manifest(directory), directory, settings(backend=backend), "cpu")
        await s.start()
        s.scheduler.prefill_budget = budget
        await s.warmup()
        try:
            results = await asyncio.gather(*(s.generate(t, p) for p in params for t in prompts))
            return [r.outputs[0].token_ids for r in results]
        finally:
            await s.stop()

    whole = asyncio.run(answers(10_000))
    assert asyncio.run(answers(3)) == whole and len(set(map(tuple, whole))) > 2


def test_a_long_prompt_joining_costs_running_rows_at_most_the_budget_per_step(repo):
    """While a long prompt is prefilled, the running request steps every iteration: each prefill call between two
    of its steps feeds at most the budget's tokens, and the long prompt joins after its last chunk."""
    directory = repo / "tiny-charlm" / "1"
    budget, long_prompt = 4, "abcdefghij" * 4

    async def run() -> list[tuple[str, int]]:
        s = GenerationServable(load_manifest(directory), directory, settings(), "cpu")
        await s.start()
        await s.warmup()
        model, calls = s.model, []
        s.scheduler.prefill_budget = budget
        step, prefill = model.step, model.prefill

        def logged_step(tokens):
            calls.append(("step", len(tokens)))
            return step(tokens)

        def logged_prefill(b):
            before = sum(p.left for p in model.staged)
            ready = prefill(b)
            calls.append(("prefill", before - sum(p.left for p in model.staged)))
            return ready

        model.step, model.prefill = logged_step, logged_prefill
        try:  # a one-token prompt joins at once and runs 64 steps; the long one is staged right behind it
            running = s.submit("x", {"temperature": 0, "max_new_tokens": 64, "min_new_tokens": 64})
            await s.generate(long_prompt, {"temperature": 0, "max_new_tokens": 1})
            await s.wait(running)
        finally:
            await s.stop()
        return calls

    calls = asyncio.run(run())
    fed = [i for i, (kind, n) in enumerate(calls) if kind == "prefill" and n]
    chunks = [calls[i][1] for i in fed]
    assert sum(chunks) == len(long_prompt) - 1 and max(chunks) <= budget and len(chunks) >= 39 / budget
    # between two chunks the running request took its step, alone (the long prompt had not joined yet)
    assert all(("step", 1) in calls[a + 1:b] and ("step", 2) not in calls[a + 1:b] for a, b in zip(fed, fed[1:]))
    assert calls[fed[-1] + 1] == ("step", 2)  # the long prompt joined right after its last chunk


def test_seq2seq_step_runner_does_not_spin_or_copy_for_nothing(repo):
    """Decoding sessions sleep between runs (spinning workers starve the scheduler thread on few cores), and a
    reorder that keeps every row in place copies no cache; a real one still moves the rows."""
    directory = repo / "tiny-seq2seq" / "1"
    step = open_step_model(load_manifest(directory), directory, backend="onnx", device="cpu", threads=1)
    assert step.decode.runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    tokens = step.join([[6, 8, 18], [9, 13]], [1, 1])
    logits = step.step(tokens)
    cache, cross = list(step.past), list(step.cross)
    step.reorder(np.arange(2), regroup=False)
    assert all(a is b for a, b in zip(step.past + step.cross, cache + cross))
    step.reorder(np.asarray([1, 1]), regroup=True)  # row 1 twice: both copies continue like row 1
    assert all(a is not b for a, b in zip(step.past + step.cross, cache + cross)) and step.rows == 2
    # one tensor per decoder layer and kind, batch first, rows contiguous
    assert len(step.past) == len(step.cross) == 2 * step.layers
    assert all(x.shape[0] == 2 and x.flags["C_CONTIGUOUS"] for x in step.past + step.cross)
    after = step.step(np.asarray([7, 7]))
    np.testing.assert_allclose(after[0], after[1], atol=1e-6)
    assert not np.allclose(logits[0][np.isfinite(logits[0])], logits[1][np.isfinite(logits[1])])


def test_a_source_that_leaves_takes_its_cross_state_with_it(repo):
    """The per-source state (cross K/V and source pad mask) shrinks as one: when the newest source leaves while
    an older, longer one stays, the next request must read its own source, not the one that left (an empty
    source leaving used to make the next request fail inside the graph)."""
    directory = repo / "tiny-seq2seq" / "1"
    step = open_step_model(load_manifest(directory), directory, backend="onnx", device="cpu", threads=1)
    alone = open_step_model(load_manifest(directory), directory, backend="onnx", device="cpu", threads=1)
    src_c = [9, 13, 7]
    want = alone.step(alone.join([src_c], [1]))[0]
    for short in ([5, 6], []):
        tokens = step.join([[6, 8, 18, 10, 4], short], [1, 1])  # a long source, then a short (or empty) one
        step.step(tokens)
        step.reorder(np.asarray([0]))  # the short one leaves, the long one stays
        tokens = np.concatenate([np.asarray([7]), step.join([src_c], [1])])
        assert step.sources == len(step.cross_src[0]) == 2
        got = step.step(tokens)[1]
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], atol=1e-5)
        step.reorder(np.zeros(0, np.int64))


def test_a_seq2seq_artifact_from_before_kv_update_still_serves_the_same_tokens(repo, tmp_path):
    """Artifacts whose decode_step returns the grown caches (no ``kv_update`` in the manifest) keep serving,
    step for step the same logits as the slot graphs, through joins, beam moves and a leaving request."""
    directory = repo / "tiny-seq2seq" / "1"
    old_dir = concat_era_copy(directory, tmp_path / "old" / "1")
    new, old = (open_step_model(load_manifest(d, verify=False), d, backend="onnx", device="cpu", threads=1)
                for d in (directory, old_dir))
    assert new.slot and not old.slot and old.decode.output_names[1] == "present_k_0"
    tokens = [m.join([[6, 8, 18, 10], [9, 13]], [2, 1]) for m in (new, old)]
    for t in range(20):  # past the first SLOTS slots, so the slot caches grow once
        if t == 5:
            tokens = [np.concatenate([tok, m.join([[7, 5, 11]], [1])]) for tok, m in zip(tokens, (new, old))]
        if t in (8, 15):  # beams follow their parents; then the first request leaves
            index = np.asarray([1, 1, 2, 3]) if t == 8 else np.asarray([2, 3])
            for m in (new, old):
                m.reorder(index, regroup=t == 15)
            tokens = [tok[index] for tok in tokens]
        got, want = (m.step(tok) for m, tok in zip((new, old), tokens))
        np.testing.assert_allclose(got, want, atol=1e-5)
        tokens = [got.argmax(1), want.argmax(1)]
    assert new.fill == old.fill == 20 and new.past_pad.shape[1] == old.past_pad.shape[1] == 32


def test_seq2seq_artifact_with_stacked_caches_is_refused_by_name(repo, tmp_path):
    """Artifacts exported before per-layer caches fed one (L,B,H,P,Dh) tensor: say so instead of failing mid-run."""
    manifest = load_manifest(repo / "tiny-seq2seq" / "1")
    del manifest.model["kv_layout"]
    with pytest.raises(ValueError, match="kv_layout is None.*re-export"):
        open_step_model(manifest, repo / "tiny-seq2seq" / "1", backend="onnx", device="cpu", threads=1)
    manifest = load_manifest(repo / "tiny-seq2seq" / "1")
    manifest.model["n_decoder_layers"] += 1  # the contract promises a layer the graphs do not have
    with pytest.raises(ValueError, match=r"n_decoder_layers=3: encode outputs lack \['cross_k_2', 'cross_v_2'\]"):
        open_step_model(manifest, repo / "tiny-seq2seq" / "1", backend="onnx", device="cpu", threads=1)


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


@contextmanager
def live_app(repo: Path, **model_settings) -> Iterator[SimpleNamespace]:
    """``create_app`` over ``repo`` on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    from deepserve.serve.app import create_app

    app = create_app(repo, settings={"backend": "onnx", **model_settings}, device="cpu")
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
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app)
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(repo):
    with live_app(repo, max_new_tokens=4000, max_beams_x_n=8) as live:
        yield live


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


def test_a_stream_sends_its_headers_and_each_event_as_json_dumps_of_it(server):
    """The SSE headers, and every event byte for byte ``data: json.dumps(event, ensure_ascii=False)``: a plain
    token's event (written from a template) and one with a beam score (rendered from its dict) alike."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        texts = []
        for params in ({"temperature": 1.0, "seed": 3, "max_new_tokens": 300}, {"num_beams": 2, "max_new_tokens": 8}):
            body = {"text_input": "it's", "parameters": params}
            with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body) as s:
                assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert (s.headers["cache-control"], s.headers["x-accel-buffering"]) == ("no-cache", "no")
                lines = [line for line in s.iter_lines() if line]
            events = [json.loads(line.removeprefix("data: ")) for line in lines]
            assert lines == [f"data: {json.dumps(e, ensure_ascii=False)}" for e in events]
            texts.append("".join(e["text_output"] for e in events))
        assert "\n" in texts[0] and "score" in events[-1]  # an escaped character, and the beam's final event


def test_a_wave_of_streams_sent_together_is_answered_in_full(server):
    """Twelve streams at once, on their own connections, each get every token: the text of the request alone."""
    body = {"text_input": "hello", "parameters": {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 12}}

    async def main() -> tuple[str, list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            alone = (await c.post("/v2/models/tiny-charlm/generate", json=body)).json()["text_output"]

            async def stream() -> str:
                async with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=body) as s:
                    return "".join([json.loads(line[6:])["text_output"] async for line in s.aiter_lines()
                                    if line.startswith("data: ")])

            return alone, await asyncio.gather(*(stream() for _ in range(12)))

    alone, texts = asyncio.run(main())
    assert len(alone) == 12 and texts == [alone] * 12


def test_requests_that_cannot_run_are_refused_and_leave_the_next_one_alone(server):
    """A source with no tokens, an ``id`` that is not a string and a non-finite parameter are 400s naming the
    problem, and a valid request after them gets exactly the answer it gets alone."""
    body = {"text_input": "12+7", "parameters": {"temperature": 0, "max_new_tokens": 6}}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        want = c.post("/v2/models/tiny-seq2seq/generate", json=body).json()
        for text in ("", "   ", "", ["  "]):
            r = c.post("/v2/models/tiny-seq2seq/generate", json={"text_input": text})
            assert r.status_code == 400 and r.json()["error"].startswith("prompt must have at least one token")
        empty = c.post("/v1/completions", json={"model": "tiny-seq2seq", "prompt": ""})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
        for ident in (5, 0, False, ["x"], {"a": 1}):
            r = c.post("/v2/models/tiny-seq2seq/generate", json={**body, "id": ident})
            assert r.status_code == 400 and r.json()["error"].startswith("id must be a string")
        for raw in (b'{"repetition_penalty": Infinity}', b'{"length_penalty": NaN}', b'{"top_p": -Infinity}'):
            r = c.post("/v2/models/tiny-seq2seq/generate", content=b'{"text_input": "1", "parameters": ' + raw + b"}")
            assert r.status_code == 400 and r.json()["error"].startswith(raw[2:].split(b'"')[0].decode())
        r = c.post("/v1/completions", content=b'{"model": "tiny-charlm", "prompt": "a", "repetition_penalty": 1e999}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
        after = c.post("/v2/models/tiny-seq2seq/generate", json={**body, "id": "next"})
        assert after.status_code == 200 and after.json() == {**want, "id": "next"}


def test_integer_parameters_take_integral_json_numbers(server):
    """JSON has one number type: 3.0 is an integer to JSON Schema and to the OpenAPI document, so it is served as
    3; 3.5 is still refused, naming the parameter."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "a", "parameters": {"max_new_tokens": 3.0}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        r = c.post("/v1/completions", json={"model": "tiny-charlm", "prompt": "a", "max_tokens": 2.0,
                                            "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        r = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "a", "parameters": {"max_new_tokens": 3.5}})
        assert r.status_code == 400 and r.json()["error"].startswith("max_new_tokens must be an integer")


def test_openai_sdk_sync_and_stream(server):
    from openai import BadRequestError, NotFoundError, OpenAI

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
    # OpenAI's error shape: the SDK shows the message and reads type / param
    assert err.value.message.startswith("Error code: 400 - max_tokens exceeds the server's cap")
    assert (err.value.type, err.value.param, err.value.code) == ("invalid_request_error", "max_tokens", None)
    assert set(err.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(NotFoundError) as missing:
        client.completions.create(model="nope", prompt="a")
    assert "nope" in missing.value.message and missing.value.code == "model_not_found"


def test_streamed_chunks_carry_logprobs(server):
    """OpenAI stream=True with logprobs, and generate_stream with logprobs: the chunks' logprobs put together
    are the ones of the non-streamed answer (greedy, so both runs generate the same tokens)."""
    from openai import OpenAI

    from deepserve.serve.generation.schemas import CompletionChunk, GenerateStreamEvent

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    args = dict(model="tiny-charlm", prompt="the ", max_tokens=9, temperature=0, logprobs=2)
    done = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(**args, stream=True))
    assert all(c.choices[0].logprobs is not None for c in chunks if c.choices[0].text)
    lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for lp in lps for t in lp.tokens] == done.logprobs.tokens
    np.testing.assert_allclose([v for lp in lps for v in lp.token_logprobs], done.logprobs.token_logprobs, rtol=1e-6)
    assert [o for lp in lps for o in lp.text_offset] == done.logprobs.text_offset
    assert [t for lp in lps for t in lp.top_logprobs] == done.logprobs.top_logprobs
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for params in ({"temperature": 0, "max_new_tokens": 6, "logprobs": 1},
                       {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 6, "logprobs": True}):
            body = {"text_input": "12+7", "parameters": params}
            whole = c.post("/v2/models/tiny-seq2seq/generate", json=body).json()
            with c.stream("POST", "/v2/models/tiny-seq2seq/generate_stream", json=body) as s:
                events = sse_events(s)
            for e in events:
                GenerateStreamEvent.model_validate(e)
            for seq in whole["sequences"]:
                mine = [e for e in events if e["index"] == seq["index"] and "logprobs" in e]
                assert [t for e in mine for t in e["tokens"]] == seq["tokens"]
                np.testing.assert_allclose([v for e in mine for v in e["logprobs"]], seq["logprobs"], rtol=1e-6)
                assert ("top_logprobs" in seq) == all("top_logprobs" in e for e in mine)
    raw = httpx.post(server.url + "/v1/completions", json={**args, "stream": True}, timeout=30)
    for line in raw.text.splitlines():
        if line.startswith("data: {"):
            CompletionChunk.model_validate_json(line[6:])


def test_declared_schemas_match_what_is_sent(server):
    """The OpenAPI document declares the generation bodies and answers, and the real answers fit them."""
    from deepserve.serve.generation.schemas import Completion, GenerateResponse, ModelList, OpenAIError

    with httpx.Client(base_url=server.url, timeout=30) as c:
        spec = c.get("/openapi.json").json()
        for path in ("/v2/models/{model}/generate", "/v2/models/{model}/versions/{version}/generate_stream",
                     "/v1/completions"):
            body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert body["additionalProperties"] is False and body["required"]
        generate = spec["paths"]["/v2/models/{model}/generate"]["post"]["responses"]
        assert generate["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateResponse")
        assert generate["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        seq = spec["components"]["schemas"]["GeneratedSequence"]["properties"]
        assert {"text_output", "tokens", "logprobs", "top_logprobs", "score", "finish_reason"} <= set(seq)
        stream = spec["paths"]["/v2/models/{model}/generate_stream"]["post"]["responses"]["200"]["content"]
        event = stream["text/event-stream"]["schema"]["properties"]["data"]  # OpenAPI 3.1: the schema of one event
        assert "logprobs" in event["contentSchema"]["anyOf"][0]["properties"]
        completions = spec["paths"]["/v1/completions"]["post"]["responses"]
        assert completions["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Completion")
        chunk = completions["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
        assert chunk[0] == {"const": "[DONE]"} and chunk[1]["contentSchema"]["anyOf"][0]["title"] == "CompletionChunk"
        assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
        listing = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert listing["$ref"].endswith("/ModelList")
        # the answers themselves fit the declarations
        beam = {"text_input": "12+7", "parameters": {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 5,
                                                     "logprobs": 2}, "id": "x"}
        GenerateResponse.model_validate(c.post("/v2/models/tiny-seq2seq/generate", json=beam).json())
        Completion.model_validate(c.post("/v1/completions", json={"model": "tiny-charlm", "prompt": ["a", "b"],
                                                                  "n": 2, "logprobs": 1, "max_tokens": 3}).json())
        ModelList.model_validate(c.get("/v1/models").json())
        for bad in ({"model": "tiny-charlm", "prompt": "a", "top_p": 3}, {"model": "tiny-charlm", "prompt": 5},
                    {"model": "tiny-charlm", "prompt": "a", "wat": 1}):
            r = c.post("/v1/completions", json=bad)
            assert r.status_code == 400 and OpenAIError.model_validate(r.json()).error.message
        r = c.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        v2 = c.post("/v2/models/tiny-charlm/generate", content=b"{not json")
        assert v2.status_code == 400 and isinstance(v2.json()["error"], str)  # /v2 keeps {"error": "..."}


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


def test_a_non_streaming_client_that_disconnects_frees_its_rows(server):
    """/generate waits for one result event; a client that hangs up meanwhile still cancels its request."""
    servable = server.app.state.repository.get("tiny-charlm")
    scheduler = servable.scheduler
    steps_before = scheduler.steps
    body = json.dumps({"text_input": "a", "parameters": {"max_new_tokens": 4000, "seed": 2}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v2/models/tiny-charlm/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert scheduler.wait_until(lambda: scheduler.steps > steps_before, 20.0)  # it runs: hang up
    assert scheduler.wait_rows(0, 20.0)
    assert scheduler.steps - steps_before < 3900  # stopped long before its 4000 tokens
    # and its handler ended then (counted as 499), not when the request's deadline passed
    requests = server.app.state.repository.metrics.requests

    def gone() -> float:
        return sum(s.value for m in requests.collect() for s in m.samples if s.name.endswith("_total")
                   and s.labels == {"model": "tiny-charlm", "endpoint": "generate", "status": "499"})

    assert wait_for(lambda: gone() >= 1, 20.0)


def test_a_full_scheduler_refuses_before_reading_the_body(repo):
    """One decoding row, held by a long stream: a typical request would wait a whole run, so /generate answers
    429 with Retry-After before it parses the body (a body that is not JSON gets the same answer), and the
    scheduler queues nothing; once the stream's client hangs up, requests are served again."""
    with live_app(repo, max_running_rows=1, max_new_tokens=10**6) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        scheduler = live.app.state.repository.get("tiny-charlm").scheduler
        long = {"text_input": "a", "parameters": {"max_new_tokens": 10**6, "seed": 3, "min_new_tokens": 10**6}}
        with c.stream("POST", "/v2/models/tiny-charlm/generate_stream", json=long) as s:
            lines = s.iter_lines()  # kept: closing it would close the stream
            assert next(lines).startswith("data: ") and scheduler.reserved == 1  # it holds the row
            for body in (b"{not json", json.dumps({"text_input": "b"}).encode()):
                for route in ("generate", "generate_stream"):
                    r = c.post(f"/v2/models/tiny-charlm/{route}", content=body,
                               headers={"Content-Type": "application/json"})
                    assert r.status_code == 429 and r.json()["code"] == "overloaded", r.text
                    assert int(r.headers["Retry-After"]) >= 1 and "decoding slot" in r.json()["error"]
            assert not scheduler.waiting
        assert scheduler.wait_rows(0, 20.0)
        r = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "b", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # test only: the server's event loop runs in another thread
    return True


def test_waiting_for_a_result_ends_with_the_deadline_or_cancels_the_request(repo):
    """``wait`` on a request that does not stream: a result, an error, the engine's own deadline timer for a
    request the scheduler dropped, and a waiter that is cancelled (client gone) cancelling its request."""
    from deepserve.serve.errors import BadRequest, DeadlineExceeded
    from deepserve.serve.generation.jobs import Event

    directory = repo / "tiny-charlm" / "1"

    async def main():
        s = GenerationServable(load_manifest(directory), directory, settings(max_new_tokens=4000), "cpu")
        await s.start()
        await s.warmup()
        try:
            ok = await s.wait(s.submit("ab", {"temperature": 0, "max_new_tokens": 5}))
            failing = s.submit("ab", {"temperature": 0, "max_new_tokens": 5})
            failing.events.put_nowait(Event("error", error=BadRequest("boom")))
            with pytest.raises(BadRequest, match="boom"):
                await s.wait(failing)
            late = s.submit("ab", {"temperature": 0, "max_new_tokens": 5}, timeout_s=0.0)
            s.scheduler.cancel(late)  # the scheduler drops it silently: only the engine's timer ends the wait
            with pytest.raises(DeadlineExceeded):
                await s.wait(late)
            steps_before = s.scheduler.steps
            long = s.submit("ab", {"temperature": 0, "max_new_tokens": 4000})
            waiter = asyncio.ensure_future(s.wait(long))
            assert await asyncio.to_thread(s.scheduler.wait_until, lambda: long in s.scheduler.running, 10.0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert long.cancelled
            assert await asyncio.to_thread(s.scheduler.wait_rows, 0, 10.0)
            return ok, s.scheduler.steps - steps_before
        finally:
            await s.stop()

    ok, steps = asyncio.run(main())
    assert ok.completion_tokens == 5 and ok.outputs[0].finish_reason == "length"
    assert steps < 3900  # the cancelled request stopped long before its 4000 tokens
