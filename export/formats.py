"""Writing graphs in each format and opening them again for parity checks.

A *runner* is the common shape every graph takes for checking: ``run(feeds: {input name: ndarray}) ->
{output name: ndarray}``; the eager model, a TorchScript file and an ONNX file each give one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepserve.export.errors import ExportError
from deepserve.export.graphs import GraphDef

OPSET = 17
"""Pinned ONNX opset."""
FORMATS = ("torchscript", "onnx")
"""Formats a user can ask for; the int8 / fp16 variants derive from the ONNX file."""
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "onnx-int8": ".int8.onnx", "onnx-fp16": ".fp16.onnx"}

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def file_name(graph: str, variant: str) -> str:
    return graph + SUFFIX[variant]


@contextlib.contextmanager
def _quiet():
    """Tracing and the ONNX exporter warn about every Python-side shape read; parity is the real check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def export_torchscript(graph: GraphDef, path: Path) -> None:
    """Trace, freeze and save ``graph.module``."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(graph.module.eval(), graph.example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        torch.jit.save(frozen, str(path))


def export_onnx(graph: GraphDef, path: Path) -> None:
    """Export with the TorchScript-based exporter at the pinned opset and run the ONNX checker."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            graph.module.eval(),
            graph.example,
            str(path),
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes=graph.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _inline_initializer_identities(path)
    check_onnx(path, graph.name)


def _inline_initializer_identities(path: Path) -> None:
    """Point consumers of ``Identity(initializer)`` straight at the initializer and drop the Identity.

    Constant folding de-duplicates equal initializers (e.g. the all-zero weights of BatchNorm-folded convs
    whose BN scale starts at zero, or LayerNorm's all-ones gains) and routes the copies through Identity
    nodes. ORT's quantizer then sees a weight that is not an initializer: Conv fails outright ("Expected ...
    to be an initializer") and MatMul weights would be re-quantized on every run."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            src = alias.get(node.input[0], node.input[0])
            if src in inits:
                alias[node.output[0]] = src
                continue
        kept.append(node)
    if not alias:
        return
    del graph.node[:]
    graph.node.extend(kept)
    _rename_inputs(graph, alias)
    onnx.save(model, str(path))


def _rename_inputs(graph: Any, alias: dict[str, str]) -> None:
    """Rename node inputs throughout ``graph`` and its subgraphs (If / Loop bodies read outer names)."""
    import onnx

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, alias)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_inputs(sub, alias)


def check_onnx(path: Path, graph_name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"graph {graph_name!r}: {path.name} fails onnx.checker: {e}") from None


def quantize_int8(src: Path, dst: Path, op_types: Sequence[str] | None = None) -> dict[str, int]:
    """Dynamic int8 quantization of weights (activations quantized at run time) for CPU, of the nodes whose op
    type is in ``op_types`` (None: every type ORT supports). Returns how many nodes of each type it replaced."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint at WARNING
    try:
        with _quiet():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(op_types) if op_types is not None else None)
    finally:
        logging.getLogger().setLevel(level)
    before = Counter(n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node)
    after = Counter(n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node)
    return {op: before[op] - after[op] for op in sorted(before) if before[op] > after[op]}


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and arithmetic for GPU; inputs and outputs stay float32 so the graph spec is unchanged."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
        model.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save(model.model, str(dst))


# ---------------------------------------------------------------------------------------------- runners


def module_runner(module: torch.nn.Module, input_names: list[str], output_names: list[str]) -> Runner:
    """Run an eager torch module on numpy feeds (graph files open through ``deepserve.serve.runtime``)."""

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(output_names, out)}

    return run
