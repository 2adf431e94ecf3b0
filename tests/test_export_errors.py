"""Export failure modes: bad input, failing parity, tampered artifacts, and the CLI's one-line errors.
Every failure must leave nothing half-written in the repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepserve.cli import main
from deepserve.export import ExportError, ParityError, export_checkpoint, verify_artifact
from deepserve.export import formats
from deepserve.manifest import sha256_file
from deepserve.train.checkpoint import save_checkpoint
from deepserve.train.models.charlm import CharRNN
from tests.artifacts import make_charlm_checkpoint, make_classifier_checkpoint


def _export(ckpt: Path, repo: Path, name: str = "m", **kw) -> Path:
    kw.setdefault("formats", ("onnx",))
    kw.setdefault("quantize", False)
    return export_checkpoint(ckpt, repository=repo, name=name, log=lambda s: None, **kw)


def _tree(root: Path) -> list[str]:
    """Every path under ``root``, hidden temporaries included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_classifier_checkpoint(tmp_path_factory.mktemp("ckpt") / "cnn.pt")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, ckpt: Path) -> Path:
    return _export(ckpt, tmp_path_factory.mktemp("repo"), "tiny", formats=("torchscript", "onnx"), quantize=True)


class Noisy(torch.nn.Module):
    """Wraps a graph module and perturbs its first output: an exporter that silently changed the model."""

    def __init__(self, inner: torch.nn.Module, noise: float) -> None:
        super().__init__()
        self.inner, self.noise = inner, noise

    def forward(self, *args):
        out = self.inner(*args)
        if isinstance(out, tuple):
            return (out[0] + self.noise, *out[1:])
        return out + self.noise


def _noisy_export(monkeypatch, which: str, graph_name: str, noise: float = 0.01) -> None:
    original = getattr(formats, which)

    def patched(graph, path):
        if graph.name == graph_name:
            graph = type(graph)(graph.name, Noisy(graph.module, noise), graph.inputs, graph.outputs, graph.example)
        return original(graph, path)

    monkeypatch.setattr(formats, which, patched)


# ---------------------------------------------------------------------------------------------- parity


def test_failing_parity_refuses_to_write(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    _noisy_export(monkeypatch, "export_onnx", "model")
    with pytest.raises(ParityError) as e:
        _export(ckpt, tmp_path / "repo")
    msg = str(e.value)
    assert "'model'" in msg and "onnx" in msg and "0.01" in msg and "tolerance 0.0001" in msg
    assert _tree(tmp_path) == []


def test_failing_parity_names_the_char_lm_step_graph(tmp_path: Path, monkeypatch) -> None:
    ckpt = make_charlm_checkpoint(tmp_path / "lm.pt")
    _noisy_export(monkeypatch, "export_torchscript", "step", noise=0.5)
    with pytest.raises(ParityError, match=r"graph 'step' \(torchscript, random-inputs\): max abs difference 0.5"):
        _export(ckpt, tmp_path / "repo", formats=("torchscript",))
    assert _tree(tmp_path / "repo") == []


def test_a_prefill_that_misreads_its_incoming_state_fails_export(tmp_path: Path, monkeypatch) -> None:
    """Serve prefills long prompts in chunks and decodes single steps through the prefill graph, each call from
    the state the previous one returned: a prefill that misreads that state agrees with the eager model (whose
    prefill it is) on random inputs and from the initial (zero) state, and must still be refused."""
    original = CharRNN.prefill
    monkeypatch.setattr(CharRNN, "prefill",
                        lambda self, tokens, state: original(self, tokens, tuple(0.5 * s for s in state)))
    ckpt = make_charlm_checkpoint(tmp_path / "lm.pt")
    with pytest.raises(ParityError, match=r"graph 'prefill' \(onnx, cached-decoding\): max abs difference .* at "
                                          r"positions \d+\.\.\d+ \((prompt|single step)\); nothing written"):
        _export(ckpt, tmp_path / "repo")
    assert _tree(tmp_path / "repo") == []


def test_noise_below_tolerance_passes(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    _noisy_export(monkeypatch, "export_onnx", "model", noise=2e-5)  # the check is a threshold, not equality
    directory = _export(ckpt, tmp_path / "repo")
    diff = json.loads((directory / "manifest.json").read_text())["parity"]["max_abs_diff"]
    assert 1e-5 < diff <= 1e-4


# ---------------------------------------------------------------------------------------------- verify


def test_verify_detects_a_tampered_file(tmp_path: Path, artifact: Path) -> None:
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(artifact, copy)
    verify_artifact(copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.onnx: sha256 mismatch"):
        verify_artifact(copy)


def test_verify_reruns_parity(tmp_path: Path, artifact: Path) -> None:
    """A consistent-looking artifact (hashes updated) whose graph no longer matches the eager reference."""
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(artifact, copy)
    with np.load(copy / "parity.npz") as npz:
        ref = {k: npz[k] for k in npz.files}
    ref["model/1/out/logits"] = ref["model/1/out/logits"] + 0.25
    np.savez(copy / "parity.npz", **ref)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["parity.npz"] = sha256_file(copy / "parity.npz")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ParityError, match=r"graph 'model' \(torchscript, random-inputs\): max abs difference 0.25"):
        verify_artifact(copy)


def test_verify_rejects_unlisted_files_and_non_artifacts(tmp_path: Path, artifact: Path) -> None:
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(artifact, copy)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="extra.bin not listed"):
        verify_artifact(copy)
    with pytest.raises(ExportError, match="not an artifact directory"):
        verify_artifact(tmp_path / "nope")
    with pytest.raises(ExportError, match="no manifest.json"):
        verify_artifact(tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"checkpoint .*missing\.pt does not exist"):
        _export(tmp_path / "missing.pt", tmp_path / "repo")
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None], ids=["garbage", "truncated"])
def test_corrupt_checkpoint(tmp_path: Path, ckpt: Path, content: bytes | None) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content if content is not None else ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"bad\.pt cannot be read"):
        _export(bad, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_unknown_model_type(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "odd.pt", task="image-classification", model_type="vit", model_args={},
                           state_dict={}, config={}, data={})
    with pytest.raises(ExportError, match=r"odd\.pt: unknown model type 'vit'; known: mlp, cnn"):
        _export(path, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_weights_not_matching_the_model(tmp_path: Path, ckpt: Path) -> None:
    payload = torch.load(ckpt, weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(ExportError, match=r"broken\.pt: weights do not match model 'cnn'"):
        _export(tmp_path / "broken.pt", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_versions_overwrite_and_next_free(tmp_path: Path, ckpt: Path) -> None:
    repo = tmp_path / "repo"
    assert _export(ckpt, repo).name == "1"
    assert _export(ckpt, repo).name == "2"
    assert _export(ckpt, repo, version=7).name == "7"
    assert _export(ckpt, repo).name == "8"
    before = {p: p.stat().st_mtime_ns for p in (repo / "m" / "2").iterdir()}
    with pytest.raises(ExportError, match=r"m/2 already exists; pass --overwrite"):
        _export(ckpt, repo, version=2)
    assert {p: p.stat().st_mtime_ns for p in (repo / "m" / "2").iterdir()} == before
    (repo / "m" / "2" / "stale.txt").write_text("old")
    assert _export(ckpt, repo, version=2, overwrite=True).name == "2"
    assert not (repo / "m" / "2" / "stale.txt").exists()
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "7", "8"]  # no temporaries left


def test_unwritable_repository(tmp_path: Path, ckpt: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportError, match=r"--repository .*file/repo.*is not a directory"):
        _export(ckpt, blocker / "repo")
    with pytest.raises(ExportError, match=r"--repository .*exists and is not a directory"):
        _export(ckpt, blocker)
    assert blocker.read_text() == ""


def test_bad_arguments(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(ExportError, match="--name '../x' is not a valid model name"):
        _export(ckpt, tmp_path / "repo", name="../x")
    with pytest.raises(ExportError, match="--format 'tflite'"):
        _export(ckpt, tmp_path / "repo", formats=("tflite",))
    with pytest.raises(ExportError, match="--fp16 derives from the ONNX graph"):
        _export(ckpt, tmp_path / "repo", formats=("torchscript",), fp16=True)
    with pytest.raises(ExportError, match="--version must be a positive integer, got 0"):
        _export(ckpt, tmp_path / "repo", version=0)
    assert _tree(tmp_path) == []


def test_failure_late_in_export_leaves_nothing(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    _export(ckpt, repo)

    def boom(src, dst, op_types=None):
        raise ExportError("quantizer exploded")

    monkeypatch.setattr(formats, "quantize_int8", boom)
    with pytest.raises(ExportError, match="quantizer exploded"):
        _export(ckpt, repo, quantize=True)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]


# ---------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_and_verify(tmp_path: Path, ckpt: Path, capsys) -> None:
    repo = tmp_path / "repo"
    code, out, _ = _cli(capsys, str(ckpt), "--name", "digits", "--repository", str(repo), "--format", "onnx",
                        "--no-quantize")
    assert code == 0 and "digits/1" in out
    code, out, _ = _cli(capsys, "--verify", str(repo / "digits" / "1"))
    assert code == 0 and out.startswith("ok: ") and "parity checks pass" in out
    manifest = json.loads((repo / "digits" / "1" / "manifest.json").read_text())
    assert set(manifest["graphs"]["model"]["files"]) == {"onnx"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["{ckpt}", "--repository", "{repo}"], "--name is required"),
        (["{ckpt}", "--name", "m"], "--repository is required"),
        (["--name", "m", "--repository", "{repo}"], "CHECKPOINT is required"),
        (["{tmp}/nope.pt", "--name", "m", "--repository", "{repo}"], "nope.pt does not exist"),
        (["{ckpt}", "--name", "m", "--repository", "{repo}", "--format", "onnx,caffe"], "--format 'onnx,caffe'"),
        (["{ckpt}", "--name", "m", "--repository", "{repo}", "--version", "0"], "--version must be a positive"),
        (["--verify", "{tmp}/nothing"], "nothing is not an artifact directory"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, ckpt: Path, capsys, argv: list[str], expected: str) -> None:
    argv = [a.format(ckpt=ckpt, repo=tmp_path / "repo", tmp=tmp_path) for a in argv]
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert err.startswith("deepserve export: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "repo").exists()
