"""Export of each family (tiny random-weight models) in both formats: files, manifest, ONNX checker, parity
numbers, and independent runs of the exported graphs against the eager model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deepserve.manifest import load_manifest, sha256_file
from deepserve.train.checkpoint import load_checkpoint, restore_model
from deepserve.train.models.seq2seq import Seq2SeqArgs, Seq2SeqTransformer
from tests.artifacts import (
    CHARLM_VOCAB,
    concat_era_copy,
    make_charlm_checkpoint,
    make_classifier_checkpoint,
    make_seq2seq_checkpoint,
)

from deepserve.export import ExportError, export_checkpoint, verify_artifact


def _export(ckpt: Path, repo: Path, name: str, **kw) -> Path:
    return export_checkpoint(ckpt, repository=repo, name=name, log=lambda s: None, **kw)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_common(directory: Path, ckpt: Path, graphs: tuple[str, ...]) -> dict:
    manifest = load_manifest(directory)  # verifies every sha256
    raw = json.loads((directory / "manifest.json").read_text())
    assert raw["format_version"] == 1
    assert set(manifest.graphs) == set(graphs)
    for name, graph in manifest.graphs.items():
        assert set(graph.files) == {"torchscript", "onnx", "onnx-int8"}
        for variant in ("onnx", "onnx-int8"):
            onnx.checker.check_model(str(directory / graph.files[variant]), full_check=True)
        model = onnx.load(str(directory / graph.files["onnx"]))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        assert [i.name for i in model.graph.input] == [t.name for t in graph.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in graph.outputs]
        assert "batch" in graph.inputs[0].shape
    assert set(manifest.files) == {p.name for p in directory.iterdir() if p.name != "manifest.json"}
    parity = manifest.parity
    assert parity["passed"] is True and parity["tolerance"] == 1e-4
    assert 0 <= parity["max_abs_diff"] <= 1e-4
    formats = {c["format"] for c in parity["checks"]}
    assert formats == {"torchscript", "onnx"}
    for check in parity["checks"]:
        assert check["passed"]
        if check["check"] == "random-inputs":
            assert len(check["cases"]) >= 3
    prov = manifest.provenance
    assert prov["checkpoint_sha256"] == sha256_file(ckpt)
    assert {"torch", "onnx", "onnxruntime"} <= set(prov["libraries"]) and prov["exported_at"]
    assert prov["metrics"]
    assert "onnx-int8" in manifest.variants
    return raw


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


# ---------------------------------------------------------------------------------------------- classifier


def test_classifier_artifact(work: Path) -> None:
    ckpt = make_classifier_checkpoint(work / "cnn.pt", labels=["cat", "dog", "owl"], channels=3, size=8)
    directory = _export(ckpt, work / "repo", "cnn")
    assert directory == work / "repo" / "cnn" / "1"
    raw = _check_common(directory, ckpt, ("model",))
    graph = raw["graphs"]["model"]
    assert graph["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
    assert graph["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]
    assert raw["labels"] == ["cat", "dog", "owl"]
    assert (directory / "labels.txt").read_text() == "cat\ndog\nowl\n"
    pre = raw["preprocessing"]
    assert (pre["channels"], pre["height"], pre["width"], pre["mean"], pre["std"]) == (3, 8, 8, [0.25] * 3, [0.3] * 3)
    assert pre["resize"] and pre["color_mode"] == "RGB"
    int8 = raw["variants"]["onnx-int8"]
    assert int8["metric"] == "top1_agreement_with_fp32" and "random" in int8["dataset"]
    assert 0.5 <= int8["top1_agreement"] <= 1.0

    # independent of the parity module: the exported graphs against the eager model at new batch sizes
    model = restore_model(load_checkpoint(ckpt))
    sess = _session(directory / "model.onnx")
    script = torch.jit.load(str(directory / "model.pt"))
    for b in (1, 6, 17):
        x = torch.randn(b, 3, 8, 8)
        with torch.no_grad():
            eager, ts = model(x).numpy(), script(x).numpy()
        (got,) = sess.run(["logits"], {"images": x.numpy()})
        assert np.abs(got - eager).max() <= 1e-4 and np.abs(ts - eager).max() <= 1e-4


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_other_classifiers_export_with_parity(work: Path, arch: str) -> None:
    ckpt = make_classifier_checkpoint(work / f"{arch}.pt", arch=arch, size=8)
    directory = _export(ckpt, work / "repo", arch, formats=("onnx",), quantize=False)
    manifest = load_manifest(directory)
    assert manifest.model["type"] == arch and set(manifest.graphs["model"].files) == {"onnx"}
    assert manifest.parity["passed"] and manifest.parity["max_abs_diff"] <= 1e-4
    assert not manifest.variants


def test_int8_accuracy_on_digits_test_split(work: Path) -> None:
    ckpt = make_classifier_checkpoint(work / "digits.pt", dataset="digits")
    directory = _export(ckpt, work / "repo", "digits", formats=("onnx",))
    int8 = load_manifest(directory).variants["onnx-int8"]
    assert int8["metric"] == "accuracy" and int8["dataset"] == "digits test split"
    assert int8["samples"] == 359  # 20% of the 1797 images, as training carves it
    assert int8["accuracy_delta"] == pytest.approx(int8["accuracy"] - int8["accuracy_fp32"])
    assert int8["op_types"] == ["MatMul", "Gemm"] and "Conv" in int8["not_quantized"]
    quantized = int8["quantized_nodes"]["model"]
    assert "Conv" not in quantized and sum(quantized.values()) == 2  # hidden + output Linear (MatMul or Gemm)


def test_resnet_int8_variant_on_digits(work: Path) -> None:
    ckpt = make_classifier_checkpoint(work / "resnet-digits.pt", arch="resnet", dataset="digits",
                                      model_args={"blocks": [2, 1]})
    directory = _export(ckpt, work / "repo", "resnet-digits", formats=("onnx",))
    manifest = load_manifest(directory)
    assert manifest.graphs["model"].files["onnx-int8"] == "model.int8.onnx"
    int8 = manifest.variants["onnx-int8"]
    assert int8["metric"] == "accuracy" and int8["dataset"] == "digits test split" and int8["samples"] == 359
    assert int8["accuracy_delta"] == pytest.approx(int8["accuracy"] - int8["accuracy_fp32"])
    assert int8["quantized_nodes"]["model"] == {"Gemm": 1}
    ops = {n.op_type for n in onnx.load(str(directory / "model.int8.onnx")).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops and "MatMulInteger" in ops
    verify_artifact(directory)  # the int8 graph runs through every parity check


def test_folded_resnet_onnx_quantizes_its_convolutions(work: Path) -> None:
    from deepserve.export.formats import quantize_int8

    # two same-shaped blocks: their zero-initialised bn2 scales fold into equal all-zero conv weights, which
    # constant folding de-duplicates behind Identity nodes, the case that broke quantize_dynamic for ResNet-18
    ckpt = make_classifier_checkpoint(work / "resnet-conv.pt", arch="resnet", model_args={"blocks": [2, 1]})
    directory = _export(ckpt, work / "repo", "resnet-conv", formats=("onnx",), quantize=False)
    model = onnx.load(str(directory / "model.onnx"))
    inits = {t.name for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in inits for n in convs)  # weights are initializers, not Identity outputs
    assert not any(n.op_type == "Identity" and n.input[0] in inits for n in model.graph.node)
    changed = quantize_int8(directory / "model.onnx", work / "all-ops.int8.onnx", op_types=None)
    assert changed == {"Conv": len(convs), "Gemm": 1}
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8), dtype=np.float32)
    (fp32,) = _session(directory / "model.onnx").run(["logits"], {"images": x})
    (int8,) = _session(work / "all-ops.int8.onnx").run(["logits"], {"images": x})
    assert int8.shape == fp32.shape and np.abs(int8 - fp32).max() < 0.5 * np.abs(fp32).max() + 1e-3


# ---------------------------------------------------------------------------------------------- char-LM


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_charlm_artifact(work: Path, cell: str) -> None:
    ckpt = make_charlm_checkpoint(work / f"{cell}.pt", cell=cell)
    directory = _export(ckpt, work / "repo", f"char-{cell}")
    raw = _check_common(directory, ckpt, ("step", "prefill"))
    state = ["h", "c"] if cell == "lstm" else ["h"]
    pre = raw["graphs"]["prefill"]
    assert pre["inputs"] == raw["graphs"]["step"]["inputs"]
    assert [t["name"] for t in pre["outputs"]] == ["logits", *[f"{s}_out" for s in state]]
    assert pre["outputs"][0]["shape"] == ["batch", len(CHARLM_VOCAB)]
    graph = raw["graphs"]["step"]
    assert [t["name"] for t in graph["inputs"]] == ["tokens", *state]
    assert [t["name"] for t in graph["outputs"]] == ["logits", *[f"{s}_out" for s in state]]
    assert graph["inputs"][0] == {"name": "tokens", "dtype": "int64", "shape": ["batch", "time"]}
    assert graph["inputs"][1]["shape"] == [2, "batch", 16]
    assert graph["outputs"][0]["shape"] == ["batch", "time", len(CHARLM_VOCAB)]
    assert raw["model"] == {"type": cell, "cell": cell, "num_layers": 2, "hidden_size": 16, "vocab_size": len(CHARLM_VOCAB)}
    assert raw["tokenizer"] == {"type": "char", "file": "vocab.json", "special_ids": {"unk": 0}}
    assert json.loads((directory / "vocab.json").read_text()) == CHARLM_VOCAB
    checks = {(c["format"], c["graph"], c["check"]): c for c in raw["parity"]["checks"]}
    for fmt in ("torchscript", "onnx"):
        for graph in ("step", "prefill"):  # serve decodes with prefill; step serves older artifacts' way
            assert checks[(fmt, graph, "cached-decoding")]["max_abs_diff"] <= 1e-4
            assert checks[(fmt, graph, "greedy")]["tokens_equal"] is True
    int8 = raw["variants"]["onnx-int8"]
    assert set(int8["next_token_top1_agreement_by_graph"]) == set(int8["greedy_token_agreement_by_graph"]) == {
        "step", "prefill"}
    assert int8["next_token_top1_agreement"] == min(int8["next_token_top1_agreement_by_graph"].values()) > 0.5

    # prefill a prompt, then single steps, through ONNX Runtime == eager full sequence
    model = restore_model(load_checkpoint(ckpt))
    tokens = torch.randint(0, len(CHARLM_VOCAB), (3, 7))
    with torch.no_grad():
        eager, _ = model(tokens, model.init_state(3))
    sess = _session(directory / "step.onnx")
    feeds = {n: s.numpy() for n, s in zip(state, model.init_state(3))}
    out = sess.run(None, {"tokens": tokens[:, :4].numpy(), **feeds})
    logits = [out[0]]
    for t in range(4, 7):
        feeds = dict(zip(state, out[1:]))
        out = sess.run(None, {"tokens": tokens[:, t : t + 1].numpy(), **feeds})
        logits.append(out[0])
    assert np.abs(np.concatenate(logits, axis=1) - eager.numpy()).max() <= 1e-4


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_charlm_prefill_equals_single_steps(work: Path, cell: str) -> None:
    """The model's prefill over T tokens == T one-token forwards (last logits and state), and its exported graph
    == the eager prefill on a batch and length other than the traced example's."""
    model = restore_model(load_checkpoint(make_charlm_checkpoint(work / f"{cell}.pt", cell=cell)))
    tokens = torch.randint(0, len(CHARLM_VOCAB), (4, 9), generator=torch.Generator().manual_seed(1))
    start = tuple(0.3 * torch.randn(s.shape, generator=torch.Generator().manual_seed(2)) for s in model.init_state(4))
    with torch.no_grad():
        last, pre_state = model.prefill(tokens, start)
        state = start
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state)
    assert last.shape == (4, len(CHARLM_VOCAB))
    torch.testing.assert_close(last, logits[:, -1], atol=1e-5, rtol=0)
    for a, b in zip(pre_state, state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    directory = _export(make_charlm_checkpoint(work / f"{cell}.pt", cell=cell), work / "repo", f"pre-{cell}")
    names = ["h", "c"][: len(start)]
    out = _session(directory / "prefill.onnx").run(None, {"tokens": tokens.numpy(),
                                                          **{n: s.numpy() for n, s in zip(names, start)}})
    assert np.abs(out[0] - last.numpy()).max() <= 1e-4
    assert all(np.abs(o - s.numpy()).max() <= 1e-4 for o, s in zip(out[1:], pre_state))


# ---------------------------------------------------------------------------------------------- seq2seq


@pytest.fixture(scope="module")
def seq2seq_export(work: Path) -> tuple[Path, dict, Path]:
    """One exported seq2seq artifact for the tests below: (checkpoint, its payload, artifact directory)."""
    ckpt = make_seq2seq_checkpoint(work / "s2s.pt")
    return ckpt, load_checkpoint(ckpt), _export(ckpt, work / "repo", "s2s")


def test_seq2seq_artifact_names_its_graphs_and_per_layer_cache_tensors(seq2seq_export: tuple[Path, dict, Path]) -> None:
    ckpt, _, directory = seq2seq_export
    raw = _check_common(directory, ckpt, ("encode", "decode_step"))
    assert [t["name"] for t in raw["graphs"]["encode"]["outputs"]] == [
        "memory", "cross_k_0", "cross_v_0", "cross_k_1", "cross_v_1"]
    dec = raw["graphs"]["decode_step"]
    assert [t["name"] for t in dec["inputs"]] == [
        "tokens", "positions", "src_pad_mask", "past_pad_mask", "cross_k_0", "cross_v_0", "past_k_0", "past_v_0",
        "cross_k_1", "cross_v_1", "past_k_1", "past_v_1"]
    assert [t["name"] for t in dec["outputs"]] == ["logits", "new_k_0", "new_v_0", "new_k_1", "new_v_1"]
    shapes = {t["name"]: t["shape"] for t in dec["inputs"] + dec["outputs"]}
    assert shapes["past_k_1"] == ["batch", 2, "past_len", 8] and shapes["cross_v_0"] == ["sources", 2, "src_len", 8]
    assert shapes["src_pad_mask"] == ["sources", "src_len"]
    assert shapes["new_v_1"] == ["batch", 2, 1, 8]  # this step's K/V only: the driver owns the cache
    assert dec["inputs"][3]["dtype"] == "bool"


def test_seq2seq_artifact_records_model_tokenizer_limits_and_parity(seq2seq_export: tuple[Path, dict, Path]) -> None:
    _, payload, directory = seq2seq_export
    raw = json.loads((directory / "manifest.json").read_text())
    vocab = payload["model"]["args"]["vocab_size"]
    assert raw["model"] == {"type": "transformer", "n_decoder_layers": 2, "n_heads": 2, "head_dim": 8, "d_model": 16,
                            "vocab_size": vocab, "kv_layout": "per-layer-shared-cross", "kv_update": "slot"}
    assert raw["tokenizer"]["file"] == "tokenizer.model" and raw["tokenizer"]["type"] == "sentencepiece"
    assert raw["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert raw["limits"] == {"vocab_size": vocab, "max_source_length": 24, "max_target_length": 16}
    assert (directory / "tokenizer.model").read_bytes() == payload["data"]["spm_model"]
    checks = {(c["format"], c["check"]): c for c in raw["parity"]["checks"]}
    for fmt in ("torchscript", "onnx"):
        assert checks[(fmt, "cached-decoding")]["max_abs_diff"] <= 1e-4
        assert checks[(fmt, "greedy")]["tokens_equal"] is True
    assert "greedy_token_agreement" in raw["variants"]["onnx-int8"]


def test_seq2seq_onnx_greedy_decoding_is_the_models_own(seq2seq_export: tuple[Path, dict, Path]) -> None:
    """Greedy decoding through ONNX Runtime (empty cache first) == the model's own cached greedy decoding."""
    from deepserve.train.models.seq2seq import greedy_decode

    _, payload, directory = seq2seq_export
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])
    expected = greedy_decode(restore_model(payload), src, max_len=8, bos=2, eos=3)
    enc, decode = _session(directory / "encode.onnx"), _session(directory / "decode_step.onnx")
    mask = (src == 0).numpy()
    cross = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, {"src": src.numpy(), "src_pad_mask": mask})))
    del cross["memory"]
    past = {f"past_{kv}_{i}": np.zeros((2, 2, 0, 8), np.float32) for i in range(2) for kv in "kv"}
    past_mask = np.zeros((2, 0), bool)
    tokens, rows = np.full((2, 1), 2, np.int64), [[], []]
    names = [o.name for o in decode.get_outputs()]
    for step in range(9):
        out = dict(zip(names, decode.run(None, {
            "tokens": tokens, "positions": np.full(2, step, np.int64), "src_pad_mask": mask,
            "past_pad_mask": past_mask, **cross, **past})))
        past = {name: np.concatenate([value, out[name.replace("past", "new")]], axis=2) for name, value in past.items()}
        past_mask = np.concatenate([past_mask, np.zeros((2, 1), bool)], axis=1)
        tokens = out["logits"].argmax(-1)[:, None]
        for r in range(2):
            rows[r].append(int(tokens[r, 0]))
    got = [(row[: row.index(3)] if 3 in row else row)[:8] for row in rows]
    assert got == expected


def test_seq2seq_verify_replays_every_check_on_the_per_layer_graphs(seq2seq_export: tuple[Path, dict, Path]) -> None:
    report = verify_artifact(seq2seq_export[2])
    assert report["passed"] and {(c["format"], c["check"]) for c in report["checks"]} >= {
        (f, c) for f in ("torchscript", "onnx") for c in ("random-inputs", "cached-decoding", "greedy")}


def test_seq2seq_verify_drives_older_layouts_as_their_manifest_says(work: Path,
                                                                    seq2seq_export: tuple[Path, dict, Path]) -> None:
    """An artifact from before kv_update (decode_step returns the grown caches) is verified as its manifest says;
    one from before kv_layout is refused by name."""
    directory = seq2seq_export[2]
    old = verify_artifact(concat_era_copy(directory, work / "concat" / "s2s" / "1"))
    assert old["passed"] and {(c["format"], c["check"]) for c in old["checks"] if c["graph"] != "encode"} == {
        ("onnx", c) for c in ("random-inputs", "cached-decoding", "greedy")}
    stale = work / "stale" / "s2s" / "1"
    shutil.copytree(directory, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    del manifest["model"]["kv_layout"]
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="kv_layout is None.*re-export"):
        verify_artifact(stale)


def test_seq2seq_rows_share_their_source_cross_kv(work: Path) -> None:
    """decode_step with the cross K/V of N sources for N * G rows (a request's beams) gives each row what it
    gets with a per-row copy of its source's K/V (the old layout), in ONNX Runtime and TorchScript; the graph
    reads no shape at run time for the one-token reshapes (constant shapes, few nodes)."""
    ckpt = make_seq2seq_checkpoint(work / "s2s-shared.pt")
    directory = _export(ckpt, work / "repo", "s2s-shared", formats=("onnx", "torchscript"), quantize=False)
    enc, dec = _session(directory / "encode.onnx"), _session(directory / "decode_step.onnx")
    script = torch.jit.load(str(directory / "decode_step.pt"))
    src = np.asarray([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0], [4, 11, 12, 3, 0]])
    src_mask = src == 0
    cross = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, {"src": src, "src_pad_mask": src_mask})))
    del cross["memory"]
    rng = np.random.default_rng(0)
    N, G, P = 3, 4, 5
    B = N * G
    past_mask = np.zeros((B, P), bool)
    past_mask[G:, :2] = True  # the rows of sources 1 and 2 joined later: left padding
    feeds = {"tokens": rng.integers(4, 12, (B, 1)), "positions": np.where(past_mask.any(1), 3, 5).astype(np.int64),
             "past_pad_mask": past_mask,
             **{f"past_{kv}_{i}": rng.normal(size=(B, 2, P, 8)).astype(np.float32) for i in range(2) for kv in "kv"}}
    names = [i.name for i in dec.get_inputs()]
    per_row = {**feeds, "src_pad_mask": np.repeat(src_mask, G, 0), **{n: np.repeat(v, G, 0) for n, v in cross.items()}}
    shared = {**feeds, "src_pad_mask": src_mask, **cross}
    expected = dec.run(None, per_row)
    got = dec.run(None, shared)
    with torch.no_grad():
        scripted = script(*[torch.from_numpy(np.asarray(shared[n])) for n in names])
    for e, g, t in zip(expected, got, scripted, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
        np.testing.assert_allclose(t.numpy(), e, atol=1e-5)
    assert not np.allclose(expected[0][0], expected[0][G])  # the sources differ, so sharing was really tested
    graph = onnx.load(str(directory / "decode_step.onnx")).graph
    assert sum(n.op_type == "Shape" for n in graph.node) <= 2  # the own-slot mask, and N for the grouping


def test_seq2seq_graphs_never_copy_a_whole_cache(work: Path) -> None:
    """Per-layer caches, read in place: no past K/V is concatenated with the new one (the step returns the new
    position's K/V, which the driver writes into its cache), no input is split or gathered out of a stacked
    tensor, and nothing re-stacks the layers (the copies that cost ~44% of a step, and later ~30% at 32 rows)."""
    directory = _export(make_seq2seq_checkpoint(work / "s2s-nocopy.pt", layers=3), work / "repo", "s2s-nocopy",
                        formats=("onnx",), quantize=False)
    graph = onnx.load(str(directory / "decode_step.onnx")).graph
    producer = {out: node for node in graph.node for out in node.output}
    for i in range(3):
        for kv in "kv":  # picked out of this step's Q/K/V projection
            chain = [producer[f"new_{kv}_{i}"]]
            while len(chain) < 3:
                chain.append(producer[chain[-1].input[0]])
            assert [n.op_type for n in chain] == ["Gather", "Reshape", "Gemm"]
    past_inputs = {f"past_{kv}_{i}" for i in range(3) for kv in "kv"}
    assert {n.op_type for n in graph.node if past_inputs & set(n.input)} <= {"MatMul", "Transpose"}
    cache_inputs = {i.name for i in graph.input if i.name.startswith(("past_k", "past_v", "cross_"))}
    assert len(cache_inputs) == 12
    readers = [n.op_type for n in graph.node if cache_inputs & set(n.input)]
    assert "Split" not in readers and "Gather" not in readers and "Slice" not in readers
    assert not any(n.op_type == "Split" for n in graph.node)
    encode = onnx.load(str(directory / "encode.onnx")).graph
    enc_producer = {out: node for node in encode.node for out in node.output}
    assert {enc_producer[f"cross_k_{i}"].op_type for i in range(3)} == {"Transpose"}


def test_seq2seq_step_folds_the_attention_scale_into_its_weights(work: Path) -> None:
    """The 1/sqrt(Dh) of both attentions is in the Q projections' weights: neither the ONNX step nor the frozen
    TorchScript step multiplies by it at run time (one op a layer and attention each, on every step)."""
    directory = _export(make_seq2seq_checkpoint(work / "s2s-scale.pt", layers=2), work / "repo", "s2s-scale")
    scale = 1.0 / np.sqrt(load_manifest(directory).model["head_dim"])

    def is_scale(t: np.ndarray) -> bool:
        return t.size == 1 and bool(np.isclose(float(t.reshape(())), scale, rtol=1e-6))

    graph = onnx.load(str(directory / "decode_step.onnx")).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    assert not [n.name for n in graph.node if n.op_type == "Mul" and any(is_scale(consts[i]) for i in n.input
                                                                          if i in consts)]
    frozen = torch.jit.load(str(directory / "decode_step.pt")).graph
    muls = [n for n in frozen.findAllNodes("aten::mul")]
    assert muls and not [n for n in muls if any(
        i.node().kind() == "prim::Constant" and i.type().kind() == "TensorType" and is_scale(i.toIValue().numpy())
        for i in n.inputs())]


def test_fp16_variant(work: Path) -> None:
    ckpt = make_classifier_checkpoint(work / "fp16.pt", seed=3)
    directory = _export(ckpt, work / "repo", "fp16", formats=("onnx",), quantize=False, fp16=True)
    manifest = load_manifest(directory)
    assert manifest.graphs["model"].files["onnx-fp16"] == "model.fp16.onnx"
    model = onnx.load(str(directory / "model.fp16.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io stays float32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    fp16 = manifest.variants["onnx-fp16"]
    assert 0 < fp16["max_abs_diff_vs_eager"]["model/random-inputs"] < 0.1 and fp16["top1_agreement"] > 0.9


def test_fp16_is_not_made_for_char_lm(work: Path) -> None:
    ckpt = make_charlm_checkpoint(work / "fp16-rnn.pt", cell="gru")
    notes: list[str] = []
    directory = export_checkpoint(ckpt, repository=work / "repo", name="fp16-rnn", formats=("onnx",), quantize=False,
                                  fp16=True, log=notes.append)
    assert "onnx-fp16" not in load_manifest(directory).graphs["step"].files
    assert any("no fp16 variant" in n for n in notes)


def test_verify_accepts_an_untouched_artifact(work: Path) -> None:
    ckpt = make_charlm_checkpoint(work / "v.pt")
    directory = _export(ckpt, work / "repo", "verify-me")
    report = verify_artifact(directory)
    assert report["passed"] and report["files_checked"] == len(load_manifest(directory).files)
    assert {c["format"] for c in report["checks"]} == {"torchscript", "onnx"}

