"""The benchmark's models: fixed random weights (no training), saved as real checkpoints and exported into a
temporary model repository with ``deepserve.export.export_checkpoint``.

Sizes are the ones the targets are stated for: the digits CNN (1x8x8, the default preset's architecture),
ResNet-18 for 3x32x32 inputs, the default char-LM (1-layer LSTM, 256 hidden) and a d_model 256, 3+3-layer
seq2seq Transformer with a 1,000-piece BPE vocabulary trained on the English text shipped with Python.

Serving variants (batching on/off, backend, one-at-a-time generation) are clones of one exported artifact under
other names, each with its own ``config.json`` of serving settings, so one server process serves all of them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepserve.manifest import MANIFEST_FILE, Manifest, load_manifest

SEED = 0


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: how to build its checkpoint."""

    name: str
    """Artifact name in the benchmark repository."""
    task: str
    """Checkpoint task."""
    model_type: str
    """``build_model`` type."""
    args: dict[str, Any]
    """Model args (fields of the model's Args dataclass)."""
    describe: str
    """One line for the results file."""
    data: Callable[[], dict[str, Any]] = field(default=lambda: {}, compare=False)
    """The checkpoint's ``data`` section (labels / vocabulary / tokenizer)."""


def _image_data(channels: int, size: int) -> dict[str, Any]:
    return {"labels": [str(i) for i in range(10)], "channels": channels, "height": size, "width": size,
            "mean": [0.5] * channels, "std": [0.25] * channels, "dataset": "random"}


CHARLM_VOCAB = ["<unk>", *[chr(c) for c in range(32, 127)], "\n"]
"""Printable ASCII and newline: what the default char-LM's vocabulary looks like."""


def corpus_lines(limit: int = 4000) -> list[str]:
    """Lines of English prose shipped with Python (pydoc's topic texts): tokenizer training and prompts."""
    import pydoc_data.topics

    lines: list[str] = []
    for text in pydoc_data.topics.topics.values():
        lines += [line.strip() for line in text.splitlines() if len(line.strip()) > 30]
    return lines[:limit]


def _seq2seq_data() -> dict[str, Any]:
    from deepserve.train.tokenizer import train_tokenizer

    spm_model = train_tokenizer(corpus_lines(), model_type="bpe", vocab_size=1000)
    return {"spm_model": spm_model, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
            "max_source_length": 64, "max_target_length": 64, "tokenizer_type": "bpe"}


MODELS: dict[str, BenchModel] = {m.name: m for m in (
    BenchModel("digits-cnn", "image-classification", "cnn",
               {"in_channels": 1, "image_size": 8, "num_classes": 10},
               "digits CNN (1x8x8 input, conv 32-64, fc 128, 10 classes)", lambda: _image_data(1, 8)),
    BenchModel("resnet18", "image-classification", "resnet",
               {"in_channels": 3, "image_size": 32, "num_classes": 10, "blocks": [2, 2, 2, 2],
                "widths": [64, 128, 256, 512]},
               "ResNet-18 (3x32x32 input, 11.2 M parameters, 10 classes)", lambda: _image_data(3, 32)),
    BenchModel("charlm", "char-lm", "lstm",
               {"vocab_size": len(CHARLM_VOCAB), "cell": "lstm", "embed_dim": 64, "hidden_size": 256,
                "num_layers": 1},
               f"char-LM (1-layer LSTM, 256 hidden, {len(CHARLM_VOCAB)} symbols)",
               lambda: {"vocab": list(CHARLM_VOCAB), "unk_id": 0}),
    BenchModel("seq2seq", "seq2seq", "transformer",
               {"d_model": 256, "n_heads": 4, "n_encoder_layers": 3, "n_decoder_layers": 3, "d_ff": 1024,
                "dropout": 0.0, "max_len": 256, "pad_id": 0},
               "seq2seq Transformer (d_model 256, 4 heads, 3+3 layers, d_ff 1024, BPE vocabulary)", _seq2seq_data),
)}


def build_checkpoint(model: BenchModel, path: Path) -> Path:
    """Random-weight checkpoint of ``model`` (seeded, so every run measures the same network)."""
    import torch

    from deepserve.train.checkpoint import save_checkpoint
    from deepserve.train.models import args_dict, model_classes

    torch.manual_seed(SEED)
    data = model.data()
    args = dict(model.args)
    if model.task == "seq2seq":
        import sentencepiece as spm

        args["vocab_size"] = spm.SentencePieceProcessor(model_proto=data["spm_model"]).get_piece_size()
    args_cls, model_cls = model_classes(model.model_type)
    parsed = args_cls(**args)
    module = model_cls(parsed).eval()
    return save_checkpoint(path, task=model.task, model_type=model.model_type, model_args=args_dict(parsed),
                           state_dict=module.state_dict(), config={"seed": SEED, "benchmark": True}, data=data,
                           metrics={})


def prepare(repository: Path, checkpoints: Path, names: list[str], log: Callable[[str], Any] = print) -> dict[str, str]:
    """Checkpoint and export each model in ``names`` unless ``repository/<name>/1`` already holds it.

    Returns notes per model for the results file (e.g. an int8 variant the exporter could not make: the model
    is then exported without it, and int8 cells say so)."""
    from deepserve.export import export_checkpoint

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        formats: tuple[str, ...] = ("torchscript", "onnx")
    except ImportError:  # e.g. a GPU machine with torch only: TorchScript is what it can serve
        formats = ("torchscript",)
    notes: dict[str, str] = {}
    for name in names:
        if (repository / name / "1" / MANIFEST_FILE).is_file():
            continue
        model = MODELS[name]
        log(f"[bench] exporting {name}: {model.describe}")
        ckpt = checkpoints / f"{name}.pt"
        if not ckpt.is_file():
            build_checkpoint(model, ckpt)
        try:
            export_checkpoint(ckpt, repository=repository, name=name, version=1, formats=formats,
                              quantize="onnx" in formats, log=lambda _: None)
        except (ValueError, RuntimeError) as e:  # the int8 pass is the fragile one: keep the fp32 graphs
            notes[name] = f"int8 export failed ({type(e).__name__}: {str(e)[:160]}); exported without int8"
            log(f"[bench] {name}: {notes[name]}")
            shutil.rmtree(repository / name, ignore_errors=True)
            export_checkpoint(ckpt, repository=repository, name=name, version=1, formats=formats,
                              quantize=False, log=lambda _: None)
    return notes


def clone(source: Path, model: str, repository: Path, name: str, settings: dict[str, Any]) -> str:
    """Copy artifact ``source/model/1`` to ``repository/name/1`` (manifest renamed) with serving ``settings``
    in ``repository/name/config.json``."""
    target = repository / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source / model / "1", target / "1")
    raw = json.loads((target / "1" / MANIFEST_FILE).read_text())
    raw["name"] = name
    Manifest.from_dict(raw).save(target / "1")
    (target / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return name


def serving_repository(source: Path, variants: dict[str, tuple[str, dict[str, Any]]]) -> Path:
    """A fresh temporary repository of ``name -> (model in source, settings)`` clones."""
    repository = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    for name, (model, settings) in variants.items():
        clone(source, model, repository, name, settings)
    return repository


def manifest(repository: Path, name: str) -> Manifest:
    return load_manifest(repository / name / "1", verify=False)


def example_image(model: str, seed: int = 0) -> np.ndarray:
    """A random image in pixel space [0, 1], C x H x W, for ``model``'s input size."""
    c, s = (1, 8) if model == "digits-cnn" else (3, 32)
    return np.random.default_rng(seed).random((c, s, s), dtype=np.float32)
