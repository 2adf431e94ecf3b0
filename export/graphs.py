"""The graphs each task exports: thin wrapper modules with the fixed I/O names of docs/ARCHITECTURE.md, their
tensor specs (dynamic axes as names), example inputs for tracing, and the architecture facts serve needs.

Facts are read from the model by probing its documented interface (state shapes, cache shapes, logits), not
from its ``Args`` field names, so the export does not depend on how each model names its hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deepserve.export.errors import ExportError
from deepserve.manifest import StepGraphContract, TensorSpec

# model type -> task it must come with
MODEL_TASKS = {
    "mlp": "image-classification",
    "cnn": "image-classification",
    "resnet": "image-classification",
    "lstm": "char-lm",
    "gru": "char-lm",
    "transformer": "seq2seq",
}


@dataclass
class GraphDef:
    """One graph to export."""

    name: str
    """Graph name in the manifest (``model``, ``step``, ``encode``, ``decode_step``)."""
    module: nn.Module
    """Wrapper whose ``forward`` takes the inputs in order and returns the outputs in order."""
    inputs: list[TensorSpec]
    """Inputs in call order; string axes are dynamic."""
    outputs: list[TensorSpec]
    """Outputs in return order."""
    example: tuple[torch.Tensor, ...]
    """Example inputs used for tracing and ONNX export."""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        specs = [*self.inputs, *self.outputs]
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs}


def _spec(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))


# ---------------------------------------------------------------------------------------------- wrappers


class ClassifierGraph(nn.Module):
    """images[B,C,H,W] -> logits[B,K]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, K)


class RNNStep(nn.Module):
    """(tokens[B,T], *state) -> (logits, *state_out), the state h[L,B,H] (GRU) or h, c (LSTM), through the model's
    ``forward`` (logits [B,T,V]) or ``prefill`` (logits [B,V])."""

    def __init__(self, model: nn.Module, method: str = "forward") -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, state_out = getattr(self.model, self.method)(tokens, state)
        return (logits, *state_out)


class Method(nn.Module):
    """One of the model's own forward passes as a module to trace (``encode_layers``, ``decode_step_layers``):
    export adds no arithmetic of its own."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *inputs: torch.Tensor):
        return getattr(self.model, self.name)(*inputs)


# ---------------------------------------------------------------------------------------------- per task


@dataclass
class TaskGraphs:
    """Everything the exporter needs to know about one model."""

    graphs: dict[str, GraphDef]
    model_facts: dict[str, Any]
    """Manifest ``model`` section."""
    contract: StepGraphContract | None = None
    """Seq2seq: what the step graphs promise their driver (the manifest records it; parity drives by it)."""


def build_graphs(task: str, model_type: str, model: nn.Module, data: dict[str, Any], where: str) -> TaskGraphs:
    """Wrap ``model`` (eval mode, CPU) into the task's graphs. ``where`` names the checkpoint in errors."""
    if model_type not in MODEL_TASKS:
        raise ExportError(f"{where}: unknown model type {model_type!r}; known: {', '.join(MODEL_TASKS)}")
    if MODEL_TASKS[model_type] != task:
        raise ExportError(f"{where}: model type {model_type!r} cannot be a {task!r} model")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if task == "image-classification":
            return _classifier(model_type, model, data, where, gen)
        if task == "char-lm":
            return _charlm(model_type, model, data, where, gen)
        return _seq2seq(model_type, model, data, where, gen)


def _require(data: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ExportError(f"{where}: checkpoint data is missing {missing}")


def _classifier(model_type: str, model: nn.Module, data: dict, where: str, gen: torch.Generator) -> TaskGraphs:
    _require(data, ("labels", "channels", "height", "width", "mean", "std"), where)
    c, h, w, k = int(data["channels"]), int(data["height"]), int(data["width"]), len(data["labels"])
    example = torch.randn(2, c, h, w, generator=gen)
    logits = model(example)
    if tuple(logits.shape) != (2, k):
        raise ExportError(f"{where}: model returns logits of shape {tuple(logits.shape)}, expected (2, {k}) for {k} labels")
    graph = GraphDef(
        name="model",
        module=ClassifierGraph(model),
        inputs=[_spec("images", "float32", "batch", c, h, w)],
        outputs=[_spec("logits", "float32", "batch", k)],
        example=(example,),
    )
    facts = {"type": model_type, "num_classes": k, "input_shape": [c, h, w]}
    return TaskGraphs({"model": graph}, facts)


def _charlm(model_type: str, model: nn.Module, data: dict, where: str, gen: torch.Generator) -> TaskGraphs:
    _require(data, ("vocab",), where)
    vocab_size = len(data["vocab"])
    state = tuple(model.init_state(2))
    cell = {2: "lstm", 1: "gru"}.get(len(state))
    if cell is None or cell != model_type:
        raise ExportError(f"{where}: model type {model_type!r} but init_state returns {len(state)} tensors")
    layers, _, hidden = state[0].shape
    tokens = torch.randint(0, vocab_size, (2, 3), generator=gen)
    state = tuple(0.1 * torch.randn(s.shape, generator=gen) for s in state)
    logits, _ = model(tokens, state)
    if logits.shape[-1] != vocab_size:
        raise ExportError(f"{where}: model has {logits.shape[-1]} outputs but the vocabulary has {vocab_size} entries")
    state_axes = (layers, "batch", hidden)
    names = ["h", "c"][: len(state)]
    inputs = [_spec("tokens", "int64", "batch", "time")] + [_spec(n, "float32", *state_axes) for n in names]
    state_out = [_spec(f"{n}_out", "float32", *state_axes) for n in names]
    step = GraphDef(name="step", module=RNNStep(model), inputs=inputs,
                    outputs=[_spec("logits", "float32", "batch", "time", vocab_size)] + state_out,
                    example=(tokens, *state))
    # the prompt in one call, logits of its last position only (the model's own ``prefill``)
    prefill = GraphDef(name="prefill", module=RNNStep(model, "prefill"), inputs=inputs,
                       outputs=[_spec("logits", "float32", "batch", vocab_size)] + state_out,
                       example=(tokens, *state))
    facts = {"type": model_type, "cell": cell, "num_layers": int(layers), "hidden_size": int(hidden),
             "vocab_size": vocab_size}
    return TaskGraphs({"step": step, "prefill": prefill}, facts)


def _seq2seq(model_type: str, model: nn.Module, data: dict, where: str, gen: torch.Generator) -> TaskGraphs:
    _require(data, ("spm_model", "pad_id", "bos_id", "eos_id", "max_source_length", "max_target_length"), where)
    src = torch.randint(4, 12, (2, 5), generator=gen)
    src_mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    memory, cross_k, cross_v = model.encode(src, src_mask)
    layers, _, heads, _, head_dim = cross_k.shape
    d_model = memory.shape[-1]
    # the example decode step: row 0 at position 3 with a full cache, row 1 at position 1 (left-padded)
    past_k = 0.1 * torch.randn(layers, 2, heads, 3, head_dim, generator=gen)
    past_v = 0.1 * torch.randn(layers, 2, heads, 3, head_dim, generator=gen)
    past_mask = torch.tensor([[False, False, False], [True, True, False]])
    tokens = torch.randint(4, 12, (2, 1), generator=gen)
    positions = torch.tensor([3, 1])
    logits, present_k, present_v = model.decode_step(tokens, positions, cross_k, cross_v, src_mask, past_k, past_v,
                                                     past_mask)
    vocab_size = logits.shape[-1]
    if tuple(present_k.shape) != (layers, 2, heads, 4, head_dim):
        raise ExportError(f"{where}: decode_step returns present_k of shape {tuple(present_k.shape)}, expected "
                          f"{(layers, 2, heads, 4, head_dim)}")
    # the graphs carry one cache tensor per decoder layer (decode_step_layers); batch stays axis 0 of each
    per_layer = [t[i] for i in range(layers) for t in (cross_k, cross_v, past_k, past_v)]
    encode, decode = Method(model, "encode_layers"), Method(model, "decode_step_layers")
    # the per-layer passes must give exactly the stacked step API's answers, also with both rows reading one
    # source (N = 1, G = 2), against the model given a copy per row
    one_k, one_v, one_mask = cross_k[:, :1].expand_as(cross_k), cross_v[:, :1].expand_as(cross_v), src_mask[:1]
    shared = [t for i in range(layers) for t in (cross_k[i, :1], cross_v[i, :1], past_k[i], past_v[i])]
    try:
        got_encode = encode(src, src_mask)
        got_decode = decode(tokens, positions, src_mask, past_mask, *per_layer)
        got_shared = decode(tokens, positions, one_mask, past_mask, *shared)
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"{where}: cannot split the {model_type!r} model's caches per layer: {e}") from None
    _same(where, "encode", got_encode, (memory, *[t[i] for i in range(layers) for t in (cross_k, cross_v)]))
    # decode_step_layers returns the new position's K/V: the last slot of the stacked API's grown caches
    _same(where, "decode_step", got_decode, (logits, *[t[i, :, :, -1:] for i in range(layers) for t in (present_k, present_v)]))
    logits1, present_k1, present_v1 = model.decode_step(tokens, positions, one_k, one_v, one_mask.expand_as(src_mask),
                                                        past_k, past_v, past_mask)
    _same(where, "decode_step", got_shared,
          (logits1, *[t[i, :, :, -1:] for i in range(layers) for t in (present_k1, present_v1)]))
    contract = StepGraphContract(int(layers), int(heads), int(head_dim), int(vocab_size), int(data["pad_id"]),
                                 int(data["bos_id"]), int(data["eos_id"]))
    graphs = _seq2seq_graphs(contract, int(d_model), encode, decode, (src, src_mask),
                             (tokens, positions, src_mask, past_mask, *per_layer))
    facts = {"type": model_type, "d_model": int(d_model), **contract.facts()}
    return TaskGraphs(graphs, facts, contract)


def _seq2seq_graphs(contract: StepGraphContract, d_model: int, encode: nn.Module, decode: nn.Module,
                    encode_example: tuple[torch.Tensor, ...],
                    decode_example: tuple[torch.Tensor, ...]) -> dict[str, GraphDef]:
    """The ``encode`` and ``decode_step`` graphs' names and axes, as ``contract`` names the caches."""
    # decode_step: B = sources * G rows (DecoderBlock.step)
    kv_src = ("sources", contract.heads, "src_len", contract.head_dim)
    kv_past = ("batch", contract.heads, "past_len", contract.head_dim)
    cross = [_spec(n, "float32", "batch", *kv_src[1:]) for n in contract.names("cross")]
    layer_inputs = [_spec(n, "float32", *(kv_src if n.startswith("cross") else kv_past))
                    for n in contract.names(("cross", "past"))]
    encode_graph = GraphDef(
        name="encode",
        module=encode,
        inputs=[_spec("src", "int64", "batch", "src_len"), _spec("src_pad_mask", "bool", "batch", "src_len")],
        outputs=[_spec("memory", "float32", "batch", "src_len", d_model), *cross],
        example=encode_example,
    )
    decode_graph = GraphDef(
        name="decode_step",
        module=decode,
        inputs=[
            _spec("tokens", "int64", "batch", 1),
            _spec("positions", "int64", "batch"),
            _spec("src_pad_mask", "bool", "sources", "src_len"),
            _spec("past_pad_mask", "bool", "batch", "past_len"),
            *layer_inputs,
        ],
        outputs=[_spec("logits", "float32", "batch", contract.vocab_size)]
        + [_spec(n, "float32", "batch", contract.heads, 1, contract.head_dim) for n in contract.step_outputs],
        example=decode_example,
    )
    return {"encode": encode_graph, "decode_step": decode_graph}


def _same(where: str, graph: str, got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-6, rtol=0):
            raise ExportError(f"{where}: the {graph} export wrapper disagrees with the model's step API "
                              f"(output {i}); the model no longer follows docs/ARCHITECTURE.md")
