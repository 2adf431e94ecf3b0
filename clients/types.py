"""Typed results of the SDK and the request bodies it sends.

Each result dataclass is built from the server's JSON by ``from_wire``; a field's JSON name is the field name
unless its metadata says ``{"wire": "..."}``. The OpenAPI agreement test reads the same metadata, so the
names checked against the server's schema are the names actually parsed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

import numpy as np

from deepserve.generation import GenerationParams, ParameterError  # noqa: F401  (re-exported)

T = TypeVar("T")


def from_wire(cls: type[T], payload: Any, what: str) -> T:
    """Build dataclass ``cls`` from a JSON object: known fields by wire name, unknown keys dropped."""
    from .errors import DeepserveError

    if not isinstance(payload, dict):
        raise DeepserveError(f"unexpected {what} response from the server: {str(payload)[:200]}")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f.metadata.get("wire", f.name)
        if key is None or key not in payload:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DeepserveError(f"unexpected {what} response from the server: no {key!r} in {str(payload)[:200]}")
            continue
        convert = f.metadata.get("convert")
        kwargs[f.name] = convert(payload[key]) if convert else payload[key]
    return cls(**kwargs)


def _versions(value: Any) -> list[str]:
    return [str(v) for v in (value or [])]


@dataclass(frozen=True)
class Prediction:
    """One class of a classification, highest probability first."""

    label: str
    """Class label."""
    probability: float
    """Softmax probability in [0, 1]."""


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the server's model index (``GET /v2/models``)."""

    name: str
    """Model name."""
    versions: list[str] = field(default_factory=list, metadata={"convert": _versions})
    """Loaded versions (as strings, the KServe convention)."""
    ready: bool = False
    """Whether the model can serve requests now."""
    reason: str | None = None
    """Why the model is not ready (load error, warming up), else ``None``."""
    task: str | None = None
    """``image-classification``, ``char-lm`` or ``seq2seq``."""


@dataclass(frozen=True)
class RepositoryEntry:
    """One model version of the repository index (``POST /v2/repository/index``), loaded or not."""

    name: str
    """Model name."""
    version: str = ""
    """Version (a string; empty for a model with no version directory)."""
    state: str = "UNAVAILABLE"
    """``READY``, ``LOADING``, ``UNLOADING`` or ``UNAVAILABLE``."""
    reason: str = ""
    """Why it is in that state (a load error, unloaded, outside the version policy), or empty."""


@dataclass(frozen=True)
class TensorInfo:
    """An input or output tensor in model metadata."""

    name: str
    """Tensor name."""
    datatype: str
    """KServe v2 datatype (``FP32``, ``INT64``, ``BYTES``...)."""
    shape: list[int]
    """Shape with -1 for dynamic axes."""


def _tensors(value: Any) -> list[TensorInfo]:
    return [from_wire(TensorInfo, t, "tensor metadata") for t in (value or [])]


@dataclass(frozen=True)
class ModelMetadata:
    """``GET /v2/models/{name}[/versions/{v}]``."""

    name: str
    """Model name."""
    versions: list[str] = field(default_factory=list, metadata={"convert": _versions})
    """Available versions."""
    platform: str = ""
    """Runtime platform, e.g. ``onnxruntime_onnx`` or ``pytorch_torchscript``."""
    inputs: list[TensorInfo] = field(default_factory=list, metadata={"convert": _tensors})
    """Request tensors of the v2 infer endpoint."""
    outputs: list[TensorInfo] = field(default_factory=list, metadata={"convert": _tensors})
    """Response tensors of the v2 infer endpoint."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """deepserve extensions: ``task``, and for classifiers the number of ``labels``."""
    raw: dict[str, Any] = field(default_factory=dict, metadata={"wire": None})
    """The whole response."""


@dataclass(frozen=True)
class InferResult:
    """``POST /v2/models/{name}/infer``: output tensors decoded to numpy."""

    model_name: str
    """Model that answered."""
    model_version: str | None = field(default=None, metadata={"convert": str})
    """Version that answered."""
    id: str | None = None
    """Request id echoed by the server."""
    outputs: dict[str, np.ndarray] = field(default_factory=dict, metadata={"wire": None})
    """Output name -> array."""


@dataclass(frozen=True)
class Sequence:
    """One returned sequence: the n-best beam hypotheses or independent samples, best first."""

    text: str = field(default="", metadata={"wire": "text_output"})
    """Decoded text."""
    index: int = 0
    """Position in the request's outputs."""
    finish_reason: str | None = None
    """``eos`` (end of sequence), ``stop`` (a stop string) or ``length`` (the token limit)."""
    num_tokens: int | None = None
    """Tokens generated for this sequence."""
    score: float | None = None
    """Beam search: the length-penalised hypothesis score."""
    tokens: list[str] | None = None
    """Text of each generated token (sent when logprobs were asked for)."""
    logprobs: list[float] | None = None
    """Log-probability of each generated token (when asked for with ``logprobs=``)."""
    top_logprobs: list[dict[str, float]] | None = None
    """Per position, the most likely alternatives (``logprobs=k`` with k > 0)."""


def _sequences(value: Any) -> list[Sequence]:
    return [from_wire(Sequence, s, "generation sequence") for s in (value or [])]


@dataclass(frozen=True)
class GenerateResult:
    """``POST /v2/models/{name}/generate``. ``tokens``/``logprobs``/``num_tokens`` are the best sequence's,
    filled from ``sequences[0]`` (the server sends sequences for n-best requests and when logprobs are asked)."""

    model_name: str
    """Model that answered."""
    text: str = field(metadata={"wire": "text_output"})
    """Generated text (the best sequence)."""
    model_version: str | None = field(default=None, metadata={"convert": str})
    """Version that answered."""
    finish_reason: str | None = None
    """``eos``, ``stop`` or ``length``."""
    score: float | None = None
    """Beam search: the best hypothesis' score."""
    usage: dict[str, int] = field(default_factory=dict)
    """``prompt_tokens`` and ``completion_tokens`` (all sequences together)."""
    id: str | None = None
    """Request id echoed by the server."""
    sequences: list[Sequence] = field(default_factory=list, metadata={"convert": _sequences})
    """Every returned sequence, best first (n-best beams or samples), when the server sends them."""
    tokens: list[str] | None = field(default=None, metadata={"wire": None})
    """Text of each token of the best sequence, when logprobs were asked for."""
    logprobs: list[float] | None = field(default=None, metadata={"wire": None})
    """Log-probability of each token of the best sequence, when asked for."""
    num_tokens: int | None = field(default=None, metadata={"wire": None})
    """Tokens generated for the best sequence (``usage.completion_tokens`` for a single sequence)."""

    def __post_init__(self) -> None:
        best = self.sequences[0] if self.sequences else None
        # Frozen: fill the best sequence's details with object.__setattr__, as dataclasses do themselves.
        if best is not None:
            object.__setattr__(self, "tokens", self.tokens if self.tokens is not None else best.tokens)
            object.__setattr__(self, "logprobs", self.logprobs if self.logprobs is not None else best.logprobs)
        if self.num_tokens is None:
            count = best.num_tokens if best is not None else self.usage.get("completion_tokens")
            object.__setattr__(self, "num_tokens", count)


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of ``generate_stream``: new text of one sequence; the last event of a sequence
    has its finish reason."""

    text: str = field(default="", metadata={"wire": "text_output"})
    """Text produced since the previous event of the same sequence."""
    index: int = 0
    """Which sequence (``num_return_sequences`` > 1) the text belongs to."""
    finish_reason: str | None = None
    """Set on a sequence's final event: ``eos``, ``stop`` or ``length``."""
    raw: dict[str, Any] = field(default_factory=dict, metadata={"wire": None})
    """The whole event payload (``model_name``, ``model_version``...)."""


class InferRequest(TypedDict, total=False):
    """JSON header of a v2 inference request."""

    id: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parameters: dict[str, Any]


GenerateParams = GenerationParams
"""Generation parameters, keyword-only, documented field by field and checked with the server's own bounds when
built (``deepserve.generation.ParameterError``, a ``ValueError`` naming ``.parameter`` and ``.value``; the
clients raise it as ``InvalidParameterError``): one declaration, ``deepserve.generation``, serves both sides."""


class GenerateRequest(TypedDict):
    """Body of ``POST .../generate`` and ``.../generate_stream``."""

    text_input: str
    parameters: dict[str, Any]
