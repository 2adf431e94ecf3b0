"""Shared test helpers: tiny random-weight models -> real checkpoints (``save_checkpoint``) -> real artifacts
(``deepserve.export.export_checkpoint``). Deterministic for a given seed, and fast (about a second each).

    from tests.artifacts import make_classifier_artifact
    directory = make_classifier_artifact(tmp_path / "repo")          # tmp_path/repo/tiny-cnn/1
"""

from __future__ import annotations

import io
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMATS = ("torchscript", "onnx")
CHARLM_VOCAB = ["<unk>", *"\n !',.?abcdefghijklmnopqrstuvwxyz"]
"""Vocabulary of the tiny char-LM: ``<unk>`` at 0, then single characters."""
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def _quiet(_: str) -> None:
    """Export log sink for tests."""


def _export(checkpoint: Path, repository: Path, name: str, version: int | None, formats: Sequence[str],
            quantize: bool) -> Path:
    from deepserve.export import export_checkpoint

    return export_checkpoint(checkpoint, repository=Path(repository), name=name, version=version,
                             formats=tuple(formats), quantize=quantize, log=_quiet)


def _randomize_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial running statistics so freezing/folding is really exercised."""
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


# ---------------------------------------------------------------------------------------------- classifier


def make_classifier_checkpoint(
    path: Path,
    *,
    arch: str = "cnn",
    seed: int = 0,
    channels: int = 1,
    size: int = 8,
    labels: Sequence[str] | None = None,
    dataset: str = "synthetic",
    metrics: dict[str, float] | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """A tiny random-weight ``mlp`` / ``cnn`` / ``resnet`` classifier checkpoint of ``size``x``size`` images.

    ``dataset="digits"`` makes export measure int8 accuracy on the real digits test split (needs 1x8x8).
    ``model_args`` overrides the tiny architecture's args (e.g. ``{"blocks": [2, 1]}``)."""
    from deepserve.train.checkpoint import save_checkpoint
    from deepserve.train.models import args_dict, model_classes

    labels = list(labels) if labels is not None else [str(i) for i in range(10)]
    torch.manual_seed(seed)
    common = {"in_channels": channels, "image_size": size, "num_classes": len(labels)}
    tiny: dict[str, dict[str, Any]] = {
        "mlp": {"hidden": [16]},
        "cnn": {"channels": [4, 8], "hidden": [16]},
        "resnet": {"blocks": [1, 1], "widths": [4, 8]},
    }
    if arch not in tiny:
        raise ValueError(f"arch must be one of {list(tiny)}, got {arch!r}")
    args_cls, model_cls = model_classes(arch)
    args = args_cls(**common, **{**tiny[arch], **(model_args or {})})
    model = model_cls(args).eval()
    _randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    data = {
        "labels": labels, "channels": channels, "height": size, "width": size,
        "mean": [0.25] * channels, "std": [0.3] * channels, "dataset": dataset,
    }
    return save_checkpoint(
        path, task="image-classification", model_type=arch, model_args=args_dict(args),
        state_dict=model.state_dict(), config={"data": {"dataset": dataset}, "seed": seed}, data=data,
        metrics=metrics if metrics is not None else {"test_accuracy": 0.1},
    )


def make_classifier_artifact(
    repository: Path,
    name: str = "tiny-cnn",
    *,
    version: int | None = 1,
    seed: int = 0,
    formats: Sequence[str] = FORMATS,
    arch: str = "cnn",
    quantize: bool = True,
    **checkpoint_kwargs: Any,
) -> Path:
    """Export a tiny classifier to ``repository/name/version`` and return that directory."""
    with tempfile.TemporaryDirectory(prefix="deepserve-ckpt-") as tmp:
        ckpt = make_classifier_checkpoint(Path(tmp) / "model.pt", arch=arch, seed=seed, **checkpoint_kwargs)
        return _export(ckpt, repository, name, version, formats, quantize)


# ---------------------------------------------------------------------------------------------- char-LM


def make_charlm_checkpoint(path: Path, *, cell: str = "lstm", seed: int = 0, num_layers: int = 2,
                           hidden_size: int = 16) -> Path:
    """A tiny random-weight char-RNN (``lstm`` or ``gru``) over ``CHARLM_VOCAB``."""
    from deepserve.train.checkpoint import save_checkpoint
    from deepserve.train.models import args_dict, model_classes

    torch.manual_seed(seed)
    args_cls, model_cls = model_classes(cell)
    args = args_cls(vocab_size=len(CHARLM_VOCAB), cell=cell, embed_dim=8, hidden_size=hidden_size,
                    num_layers=num_layers)
    model = model_cls(args).eval()
    return save_checkpoint(
        path, task="char-lm", model_type=cell, model_args=args_dict(args), state_dict=model.state_dict(),
        config={"seed": seed}, data={"vocab": list(CHARLM_VOCAB), "unk_id": 0}, metrics={"val_loss": 3.4},
    )


def make_charlm_artifact(
    repository: Path,
    name: str = "tiny-charlm",
    *,
    version: int | None = 1,
    seed: int = 0,
    cell: str = "lstm",
    formats: Sequence[str] = FORMATS,
    quantize: bool = True,
) -> Path:
    """Export a tiny char-LM to ``repository/name/version`` and return that directory."""
    with tempfile.TemporaryDirectory(prefix="deepserve-ckpt-") as tmp:
        ckpt = make_charlm_checkpoint(Path(tmp) / "model.pt", cell=cell, seed=seed)
        return _export(ckpt, repository, name, version, formats, quantize)


# ---------------------------------------------------------------------------------------------- seq2seq


def math_lines(n: int = 200, seed: int = 0) -> list[str]:
    """Generated arithmetic lines (``"12+7=19"``) to train the tiny tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"{a}{op}{b}={_apply(a, op, b)}")
    lines.append("(3+4)*2=14")
    return lines


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_spm_model(lines: Sequence[str] | None = None) -> bytes:
    """A char-level SentencePiece model trained in memory; ids pad=0 unk=1 bos=2 eos=3."""
    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or math_lines()), model_writer=writer, model_type="char", vocab_size=64,
        hard_vocab_limit=False, character_coverage=1.0, normalization_rule_name="identity",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2,
    )
    return writer.getvalue()


def make_seq2seq_checkpoint(path: Path, *, seed: int = 0, d_model: int = 16, n_heads: int = 2,
                            layers: int = 2, max_source_length: int = 24, max_target_length: int = 16) -> Path:
    """A tiny random-weight seq2seq Transformer with a real char SentencePiece tokenizer."""
    import sentencepiece as spm

    from deepserve.train.checkpoint import save_checkpoint
    from deepserve.train.models import args_dict, model_classes

    spm_bytes = make_spm_model()
    vocab_size = spm.SentencePieceProcessor(model_proto=spm_bytes).get_piece_size()
    torch.manual_seed(seed)
    args_cls, model_cls = model_classes("transformer")
    args = args_cls(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_encoder_layers=layers,
                    n_decoder_layers=layers, d_ff=2 * d_model, dropout=0.0, max_len=64, pad_id=0)
    model = model_cls(args).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits: widen for distinct argmaxes
        model.embed.weight.mul_(25.0)
    data = {
        "spm_model": spm_bytes, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
        "max_source_length": max_source_length, "max_target_length": max_target_length, "tokenizer_type": "char",
    }
    return save_checkpoint(
        path, task="seq2seq", model_type="transformer", model_args=args_dict(args), state_dict=model.state_dict(),
        config={"seed": seed}, data=data, metrics={"val_loss": 3.9, "exact_match": 0.0},
    )


def make_seq2seq_artifact(
    repository: Path,
    name: str = "tiny-seq2seq",
    *,
    version: int | None = 1,
    seed: int = 0,
    formats: Sequence[str] = FORMATS,
    quantize: bool = True,
) -> Path:
    """Export a tiny seq2seq Transformer to ``repository/name/version`` and return that directory."""
    with tempfile.TemporaryDirectory(prefix="deepserve-ckpt-") as tmp:
        ckpt = make_seq2seq_checkpoint(Path(tmp) / "model.pt", seed=seed)
        return _export(ckpt, repository, name, version, formats, quantize)


def tampered_copy(artifact: Path, repository: Path, name: str = "tampered", file: str = "model.onnx") -> Path:
    """A copy of ``artifact`` as ``repository/name/1`` with one byte appended to ``file``: its sha256 no longer
    matches the manifest, so serving marks it not ready."""
    import shutil

    target = Path(repository) / name / "1"
    shutil.copytree(artifact, target)
    with open(target / file, "ab") as f:
        f.write(b"\0")
    return target


def concat_era_copy(directory: Path, target: Path) -> Path:
    """``directory``'s seq2seq artifact as exported before ``kv_update``, copied to ``target``: its ONNX decode_step
    returns each layer's grown cache (``present_k_i`` = past ++ new), the manifest has no ``kv_update`` entry and
    lists decode_step's ONNX file only (the others still return ``new_*``), the parity reference holds such a
    graph's answers, and every file's sha256 is anew."""
    import json
    import shutil

    import onnx

    from deepserve.manifest import hash_directory

    shutil.copytree(directory, target)
    model = onnx.load(str(target / "decode_step.onnx"))
    for out in model.graph.output:
        if out.name.startswith("new_"):
            present, past = out.name.replace("new_", "present_"), out.name.replace("new_", "past_")
            model.graph.node.append(onnx.helper.make_node("Concat", [past, out.name], [present], axis=2))
            out.name = present
            out.type.tensor_type.shape.dim[2].dim_param = "present_len"
    onnx.save(model, str(target / "decode_step.onnx"))
    raw = json.loads((target / "manifest.json").read_text())
    del raw["model"]["kv_update"]
    decode = raw["graphs"]["decode_step"]
    decode["files"] = {"onnx": decode["files"]["onnx"]}
    for out in decode["outputs"]:
        if out["name"].startswith("new_"):
            out["name"], out["shape"][2] = out["name"].replace("new_", "present_"), "present_len"
    with np.load(target / "parity.npz") as npz:  # the reference's decode_step answers as such a graph gave them
        ref = {k: npz[k] for k in npz.files}
    for key in [k for k in ref if k.startswith("decode_step/") and "/out/new_" in k]:
        past = ref[key.replace("/out/new_", "/in/past_")]
        ref[key.replace("/out/new_", "/out/present_")] = np.concatenate([past, ref.pop(key)], axis=2)
    np.savez(target / "parity.npz", **ref)
    raw["files"] = hash_directory(target)
    (target / "manifest.json").write_text(json.dumps(raw))
    return target
