"""The artifact contract between export and serve.

An artifact is a directory ``<repository>/<name>/<version>/`` holding ``manifest.json`` and the files it
lists. This module defines the manifest schema, reads and validates it, and checks file hashes. It must
import neither torch nor any training code: serve depends on it alone.

``manifest.json`` (``format_version`` 1)::

    {
      "format_version": 1,
      "name": "digits-cnn", "version": 1,
      "task": "image-classification" | "char-lm" | "seq2seq",
      "graphs": {                       # graph name -> spec; names per task in docs/ARCHITECTURE.md
        "model": {
          "inputs":  [{"name": "images", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
          "files": {"torchscript": "model.pt", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
        }
      },
      "model": {"type": "cnn", ...},     # architecture facts serve needs (layers, hidden size, heads...)
      "preprocessing": {"channels": 1, "height": 8, "width": 8, "mean": [..], "std": [..],
                        "resize": "bilinear", "color_mode": "L"},   # image-classification only
      "labels": ["0", "1", ...],         # image-classification only (also written as labels.txt)
      "tokenizer": {"type": "char" | "sentencepiece", "file": "vocab.json" | "tokenizer.model",
                    "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3}},   # generators only
      "limits": {"vocab_size": 96, "max_source_length": 64, "max_target_length": 64},
      "variants": {"onnx-int8": {"method": ..., "op_types": ["MatMul", "Gemm"], "not_quantized": {...},
                                 "accuracy_fp32": 0.983, "accuracy": 0.983, "accuracy_delta": 0.0, ...}},
      "parity": {...}, "provenance": {...},
      "files": {"model.onnx": "<sha256>", ...}           # every file in the directory except manifest.json
    }                                                    # and manifest.sig

An artifact may carry ``manifest.sig`` (see ``deepserve.signing``): a signature of ``manifest.json``, which
through ``files`` covers every other file.

Shapes use ints for fixed axes and strings for dynamic ones (named axes). Variant keys in ``files`` are
``torchscript``, ``onnx``, ``onnx-int8``, ``onnx-fp16``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
"""Optional signature of ``manifest.json`` (``deepserve.signing``); like the manifest, not listed in ``files``."""
TASKS = ("image-classification", "char-lm", "seq2seq")
DTYPES = ("float32", "float16", "int64", "int32", "bool", "uint8")
VARIANTS = ("torchscript", "onnx", "onnx-int8", "onnx-fp16")


class ManifestError(ValueError):
    """The manifest or the artifact it describes is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    """Tensor name inside the graph."""
    dtype: str
    """Element type, one of ``DTYPES``."""
    shape: tuple[int | str, ...]
    """Fixed axes as ints, dynamic axes as names."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> TensorSpec:
        try:
            name, dtype, shape = raw["name"], raw["dtype"], raw["shape"]
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where}: tensor spec needs name, dtype and shape ({e})") from None
        if dtype not in DTYPES:
            raise ManifestError(f"{where}.{name}: dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, (int, str)) for d in shape):
            raise ManifestError(f"{where}.{name}: shape must be a list of ints and axis names, got {shape!r}")
        return cls(name=name, dtype=dtype, shape=tuple(shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def v2_shape(self) -> list[int]:
        """The shape as the KServe v2 protocol writes it: -1 for dynamic axes."""
        return [d if isinstance(d, int) else -1 for d in self.shape]


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph and the files holding it in each format."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]
    """Variant (``VARIANTS``) -> file name relative to the artifact directory."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> GraphSpec:
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: must be an object")
        files = raw.get("files") or {}
        unknown = set(files) - set(VARIANTS)
        if unknown:
            raise ManifestError(f"{where}.files: unknown variants {sorted(unknown)}; known: {VARIANTS}")
        if not files:
            raise ManifestError(f"{where}.files: no graph file listed")
        return cls(
            inputs=tuple(TensorSpec.from_dict(t, f"{where}.inputs") for t in raw.get("inputs", [])),
            outputs=tuple(TensorSpec.from_dict(t, f"{where}.outputs") for t in raw.get("outputs", [])),
            files=dict(files),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "files": dict(self.files),
        }


_REQUIRED_GRAPHS = {
    "image-classification": ("model",),
    "char-lm": ("step",),
    "seq2seq": ("encode", "decode_step"),
}


@dataclass
class Manifest:
    """A parsed, validated ``manifest.json``. Unknown keys are kept in ``extra``."""

    name: str
    version: int
    task: str
    graphs: dict[str, GraphSpec]
    files: dict[str, str]
    """File name -> sha256 hex digest, for every file of the artifact but the manifest."""
    model: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ManifestError(f"task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.version, int) or self.version < 1:
            raise ManifestError(f"version must be a positive integer, got {self.version!r}")
        missing = [g for g in _REQUIRED_GRAPHS[self.task] if g not in self.graphs]
        if missing:
            raise ManifestError(f"task {self.task!r} needs graphs {missing}")
        if self.task == "image-classification":
            for key in ("channels", "height", "width", "mean", "std"):
                if key not in self.preprocessing:
                    raise ManifestError(f"preprocessing.{key} is required for image-classification")
            if not self.labels:
                raise ManifestError("labels are required for image-classification")
        elif "file" not in self.tokenizer or "type" not in self.tokenizer:
            raise ManifestError(f"tokenizer.type and tokenizer.file are required for {self.task}")

    _KNOWN = (
        "format_version", "name", "version", "task", "graphs", "files", "model", "preprocessing",
        "labels", "tokenizer", "limits", "variants", "parity", "provenance",
    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestError("manifest must be a JSON object")
        fv = raw.get("format_version")
        if fv != FORMAT_VERSION:
            raise ManifestError(f"format_version {fv!r} is not supported (this deepserve reads {FORMAT_VERSION})")
        for key in ("name", "version", "task", "graphs", "files"):
            if key not in raw:
                raise ManifestError(f"manifest is missing {key!r}")
        if not isinstance(raw["graphs"], dict) or not isinstance(raw["files"], dict):
            raise ManifestError("graphs and files must be objects")
        return cls(
            name=raw["name"],
            version=raw["version"],
            task=raw["task"],
            graphs={k: GraphSpec.from_dict(v, f"graphs.{k}") for k, v in raw["graphs"].items()},
            files=dict(raw["files"]),
            model=dict(raw.get("model") or {}),
            preprocessing=dict(raw.get("preprocessing") or {}),
            labels=list(raw.get("labels") or []),
            tokenizer=dict(raw.get("tokenizer") or {}),
            limits=dict(raw.get("limits") or {}),
            variants=dict(raw.get("variants") or {}),
            parity=dict(raw.get("parity") or {}),
            provenance=dict(raw.get("provenance") or {}),
            extra={k: v for k, v in raw.items() if k not in cls._KNOWN},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "model": self.model,
            "preprocessing": self.preprocessing,
            "labels": self.labels,
            "tokenizer": self.tokenizer,
            "limits": self.limits,
            "variants": self.variants,
            "parity": self.parity,
            "provenance": self.provenance,
            "files": self.files,
        }
        out.update(self.extra)
        return out

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


KV_LAYOUT = "per-layer-shared-cross"
"""Manifest ``model.kv_layout`` of seq2seq artifacts: one cross / past / present K and V tensor per decoder layer
(``cache_names``), each [batch,H,len,Dh]; ``decode_step`` takes the cross K/V (and ``src_pad_mask``) of N sources
for B = N * G rows, rows n*G .. n*G+G-1 reading source n. Earlier layouts (``per-layer``: cross K/V per row, or
none: stacked caches) are refused with a request to re-export."""


class KVUpdate(str, Enum):
    """Manifest ``model.kv_update``: what ``decode_step`` returns for the self-attention caches."""

    CONCAT = "concat"
    """``present_k_i`` / ``present_v_i`` [B,H,P+1,Dh]: the past with this step's K/V appended, the next step's past
    as it is (artifacts exported before ``kv_update`` existed, which lack the entry)."""
    SLOT = "slot"
    """``new_k_i`` / ``new_v_i`` [B,H,1,Dh]: this step's K/V only; the driver writes them into its own cache
    buffers, which may hold empty slots (``past_pad_mask`` True) past the filled ones, so no step copies a cache."""


def cache_names(kinds: str | tuple[str, ...], layers: int) -> list[str]:
    """A seq2seq step graph's per-layer tensors of ``kinds`` (cross | past | present | new), in graph order: layer by
    layer, kind by kind, K then V (``cross_k_0, cross_v_0, past_k_0, past_v_0, cross_k_1, ...``)."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    return [f"{kind}_{kv}_{i}" for i in range(layers) for kind in kinds for kv in "kv"]


@dataclass(frozen=True)
class StepGraphContract:
    """What the seq2seq ``encode`` / ``decode_step`` graphs promise their driver: the cache layout and sizes
    (manifest ``model``) and the special ids (``tokenizer.special_ids``). Export writes them; serve reads them
    with ``of``."""

    layers: int
    """Decoder layers: one cross, past and present K and V tensor each."""
    heads: int
    """Attention heads (axis 1 of every cache tensor)."""
    head_dim: int
    """Size of one head (axis 3)."""
    vocab_size: int
    """Width of ``logits``."""
    pad_id: int = 0
    bos_id: int = 2
    """The first input token of every target."""
    eos_id: int = 3
    kv_layout: str = KV_LAYOUT
    """How the caches are laid out; serve drives ``KV_LAYOUT`` only."""
    kv_update: KVUpdate = KVUpdate.SLOT
    """What ``decode_step`` returns for the caches (``KVUpdate``; absent from older manifests: ``CONCAT``)."""

    def facts(self) -> dict[str, Any]:
        """The manifest ``model`` entries export writes."""
        return {"n_decoder_layers": self.layers, "n_heads": self.heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "kv_layout": self.kv_layout, "kv_update": self.kv_update.value}

    @property
    def step_outputs(self) -> list[str]:
        """``decode_step``'s cache outputs, in graph order."""
        return self.names("new" if self.kv_update is KVUpdate.SLOT else "present")

    def names(self, kinds: str | tuple[str, ...]) -> list[str]:
        return cache_names(kinds, self.layers)

    @classmethod
    def of(cls, manifest: Manifest) -> StepGraphContract:
        """The contract of a seq2seq artifact; ``ManifestError`` naming what is missing or from another layout."""
        facts, special = manifest.model, manifest.tokenizer.get("special_ids") or {}
        if facts.get("kv_layout") != KV_LAYOUT:
            raise ManifestError(f"manifest model.kv_layout is {facts.get('kv_layout')!r}, but this deepserve drives "
                                f"{KV_LAYOUT!r} key/value caches (one tensor per decoder layer, cross K/V shared by a "
                                "source's rows); re-export the checkpoint with `deepserve export`")
        missing = [k for k in ("n_decoder_layers", "n_heads", "head_dim", "vocab_size") if k not in facts]
        if missing:
            raise ManifestError(f"manifest model lacks {missing} (seq2seq step graphs)")
        try:
            update = KVUpdate(facts.get("kv_update", KVUpdate.CONCAT.value))
        except ValueError:
            raise ManifestError(f"manifest model.kv_update is {facts['kv_update']!r}; this deepserve knows "
                                f"{[u.value for u in KVUpdate]}") from None
        contract = cls(int(facts["n_decoder_layers"]), int(facts["n_heads"]), int(facts["head_dim"]),
                       int(facts["vocab_size"]), int(special.get("pad", 0)), int(special.get("bos", 2)),
                       int(special.get("eos", 3)), kv_update=update)
        contract.check(manifest)
        return contract

    def check(self, manifest: Manifest) -> None:
        """Raise ``ManifestError`` naming any per-layer tensor the graphs lack."""
        enc, dec = manifest.graphs["encode"], manifest.graphs["decode_step"]
        need = {"encode outputs": (self.names("cross"), enc.outputs),
                "decode_step inputs": (self.names(("cross", "past")), dec.inputs),
                "decode_step outputs": (["logits", *self.step_outputs], dec.outputs)}
        for what, (names, specs) in need.items():
            missing = sorted(set(names) - {t.name for t in specs})
            if missing:
                raise ManifestError(f"the seq2seq graphs do not match model.n_decoder_layers={self.layers}: "
                                    f"{what} lack {missing}")


@dataclass(frozen=True)
class CharLMGraphContract:
    """What the char-LM graphs promise their driver. ``step``: (tokens[B,T], *state) -> (logits[B,T,V],
    *state_out); ``prefill`` (optional; artifacts exported before it have only ``step``): the same inputs ->
    (logits[B,V] of the last position, *state_out). State is ``h`` (and ``c`` for LSTM), each [L,B,H]."""

    layers: int
    hidden: int
    vocab_size: int
    state: tuple[str, ...]
    """State input names in call order; each has an output ``<name>_out``."""
    prefill: bool
    """Whether the artifact has the ``prefill`` graph."""

    @classmethod
    def of(cls, manifest: Manifest) -> CharLMGraphContract:
        """The contract of a char-LM artifact; ``ManifestError`` naming a ``prefill`` graph that breaks it."""
        step, facts = manifest.graphs["step"], manifest.model
        h = step.inputs[1].shape
        contract = cls(int(facts.get("num_layers", h[0])), int(facts.get("hidden_size", h[2])),
                       int(facts.get("vocab_size", step.outputs[0].shape[-1])),
                       tuple(t.name for t in step.inputs[1:]), "prefill" in manifest.graphs)
        if contract.prefill:
            pre = manifest.graphs["prefill"]
            if ([t.name for t in pre.inputs] != [t.name for t in step.inputs]
                    or [t.name for t in pre.outputs] != [t.name for t in step.outputs] or len(pre.outputs[0].shape) != 2):
                raise ManifestError("graph prefill must take the step graph's inputs and return logits [batch, vocab] "
                                    "and the same state outputs; re-export the checkpoint with `deepserve export`")
        return contract


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under ``directory`` except the manifest and its signature, keyed by relative
    path."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
    }


def load_manifest(directory: Path, *, verify: bool = True) -> Manifest:
    """Read ``directory/manifest.json``; with ``verify``, check that every listed file exists with its sha256
    and that every file the graphs name is listed. Raises ``ManifestError`` naming the file at fault."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    manifest = Manifest.from_dict(raw)
    for graph_name, graph in manifest.graphs.items():
        for variant, file in graph.files.items():
            if file not in manifest.files:
                raise ManifestError(f"graphs.{graph_name}.files.{variant}: {file} has no sha256 in files")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        file = Path(directory) / name
        if not file.is_file():
            raise ManifestError(f"{file}: listed in the manifest but missing")
        actual = sha256_file(file)
        if actual != expected:
            raise ManifestError(f"{file}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")
