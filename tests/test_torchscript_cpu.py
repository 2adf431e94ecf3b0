"""Serving exported step graphs on CPU: TorchScript's numpy in and out (the step runner's caches stay numpy for
either backend), its fast path's row GELU, and which graphs get a one-thread copy for small steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepserve.export import export_checkpoint
from deepserve.manifest import load_manifest
from deepserve.serve.generation.step_models import open_step_model
from tests.artifacts import make_charlm_checkpoint, make_seq2seq_checkpoint

PROMPTS = [[5, 6, 7, 8], [9, 10]]  # joined as two beams of the first prompt, one row of the second
PARTED = np.array([7, 11, 9])  # the second step's tokens: the two beams part ways
SWAP = np.array([1, 0, 2])  # the beams swap rows (beam search's back-pointers), the other row stays


def _export(ckpt: Path, name: str) -> Path:
    return export_checkpoint(ckpt, repository=ckpt.parent / "repo", name=name, formats=("onnx", "torchscript"),
                             quantize=False, log=lambda s: None)


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(make_seq2seq_checkpoint(tmp_path_factory.mktemp("ts-cpu") / "s2s.pt", layers=2), "s2s")


def test_torchscript_step_model_on_cpu_keeps_numpy_state_and_decodes_like_onnx(seq2seq: Path) -> None:
    """On CPU the TorchScript step graphs take and return numpy, as ONNX Runtime's do, so the step runner keeps its
    caches in numpy (moved in place when beams swap) for either backend. Two beams that have parted ways swap rows:
    each then continues exactly as the other would have on a runner that did not swap; both backends pick the
    same tokens."""
    manifest = load_manifest(seq2seq)
    picked = {}
    for backend in ("onnx", "torchscript"):
        kept, swapped = (open_step_model(manifest, seq2seq, backend=backend, device="cpu", threads=1)
                         for _ in range(2))
        assert kept.platform == ("pytorch_libtorch" if backend == "torchscript" else "onnxruntime_onnx")
        for model in (kept, swapped):
            model.step(model.join(PROMPTS, [2, 1]))
            model.step(PARTED)
        swapped.reorder(SWAP, regroup=False)
        tokens, steps = PARTED, []
        for _ in range(4):
            logits, moved = kept.step(tokens), swapped.step(tokens[SWAP])
            assert isinstance(moved, np.ndarray) and all(isinstance(x, np.ndarray) for x in swapped.past)
            assert not np.allclose(logits[0], logits[1], atol=1e-3)  # the beams' caches really differ
            np.testing.assert_allclose(moved, logits[SWAP], atol=1e-5)
            tokens = logits.argmax(-1)
            steps.append(tokens.tolist())
        picked[backend] = steps
    assert picked["torchscript"] == picked["onnx"]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_only_step_graphs_get_a_one_thread_copy(seq2seq: Path, tmp_path: Path, backend: str) -> None:
    """Small steps run on a one-thread copy of the step graph (on ONNX Runtime a session of its own); the seq2seq
    encoder never does, so it gets no copy (it was a second, idle encoder session per model)."""
    model = open_step_model(load_manifest(seq2seq), seq2seq, backend=backend, device="cpu", threads=2)
    assert model.decode.narrow is not None and model.decode.narrow.runtime.threads == 1
    assert model.decode.rows(1) is model.decode.narrow and model.decode.rows(64) is model.decode
    assert model.encode.narrow is None
    charlm = _export(make_charlm_checkpoint(tmp_path / "lm.pt"), "lm")
    lm = open_step_model(load_manifest(charlm), charlm, backend=backend, device="cpu", threads=2)
    assert lm.graph.rows(1) is lm.graph.narrow is not None


def test_torchscript_cpu_fast_path_runs_row_gelu_on_torch_kernel_with_the_same_answer() -> None:
    """The GELU of an addmm (the seq2seq step's rows) gets a transposed view (aten sends only contiguous input to
    oneDNN, costly per call at decode-step sizes); others (an encoder's (B,S,F)) keep theirs. Answers equal to
    float rounding."""
    from deepserve.serve import runtime
    from deepserve.train.models.seq2seq import affine

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 32)

        def forward(self, rows: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.nn.functional.gelu(affine(rows, self.fc)), torch.nn.functional.gelu(self.fc(seq))

    torch.manual_seed(0)
    model, rows, seq = Both().eval(), torch.randn(4, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, (rows, seq)))
        fast = runtime._cpu_fast_path(torch, frozen)
        got, expected = fast(rows, seq), model(rows, seq)
    fed = sorted(n.inputsAt(0).node().kind() for n in frozen.graph.findAllNodes("aten::gelu"))
    assert fed[-1] == "aten::t" and fed[0] != "aten::t"
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
