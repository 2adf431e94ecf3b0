"""The one graph runtime: an ONNX or TorchScript graph opened on a device, behind ``run(inputs) -> outputs``,
numpy in and out, keyed by the graph's tensor names (the classifier, export's parity checks), and ``call``, the
graph's native arrays in and out (the step models, whose state stays where the graph runs: numpy on CPU, torch
tensors on CUDA). Torch is imported only for TorchScript, so ONNX-only serving stays torch-free. Called from a
worker thread, never on the event loop.

ONNX Runtime and TorchScript sessions are opened by ``serve/backends.py`` (device and thread choices live
there). On CUDA, TorchScript inputs are staged through pinned host buffers that are reused across batches,
so a batch crosses to the device once, asynchronously; the only synchronisation is reading the outputs back,
once per batch.
"""

from __future__ import annotations

import abc
import copy
from pathlib import Path
from typing import Any

import numpy as np

from deepserve.manifest import GraphSpec
from deepserve.serve.backends import (
    BackendUnavailable,
    DeviceName,
    GraphChoice,
    choose_graph,
    import_torch,
    onnx_session,
    torchscript_module,
)

Tensors = dict[str, np.ndarray]


class GraphRuntime(abc.ABC):
    """One opened graph on one device."""

    platform: str = ""
    """Triton's platform name for metadata (onnxruntime_onnx, pytorch_libtorch)."""

    @property
    def inline_safe(self) -> bool:
        """Whether batches may run on whichever thread calls (the batcher's ``inline_batch_ms``), not only on
        the instance's worker thread."""
        return True

    def __init__(self, graph: GraphSpec, choice: GraphChoice, device: DeviceName) -> None:
        self.graph = graph
        self.choice = choice
        self.device = device
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]

    @abc.abstractmethod
    def call(self, *arrays: Any) -> list[Any]:
        """Run on native arrays in the graph's input order (numpy on CPU, torch tensors on the device for
        TorchScript on CUDA); returns the outputs in order, native too."""

    @abc.abstractmethod
    def run(self, inputs: Tensors) -> Tensors:
        """Run one batch; every input and output has the batch as its first axis."""

    @abc.abstractmethod
    def narrow(self) -> GraphRuntime | None:
        """This graph on one CPU intra-op thread, for small batches (None: it already is, or not on CPU)."""


class OnnxRuntime(GraphRuntime):
    platform = "onnxruntime_onnx"

    def __init__(self, graph: GraphSpec, choice: GraphChoice, device: DeviceName, threads: int | None) -> None:
        super().__init__(graph, choice, device)
        self.threads = threads
        self.session = onnx_session(choice.file, device, threads=threads)
        have = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.input_names if n not in have]
        if missing:
            raise BackendUnavailable(f"{choice.file.name}: graph has no inputs {missing} (it has {sorted(have)})")

    def call(self, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(zip(self.input_names, arrays)))

    def run(self, inputs: Tensors) -> Tensors:
        return dict(zip(self.output_names, self.call(*[inputs[n] for n in self.input_names])))

    def narrow(self) -> OnnxRuntime | None:
        if self.device != "cpu" or (self.threads or 0) <= 1:
            return None
        return OnnxRuntime(self.graph, self.choice, self.device, 1)  # a session of its own: ORT's pool is fixed


class TorchScriptRuntime(GraphRuntime):
    platform = "pytorch_libtorch"

    def __init__(self, graph: GraphSpec, choice: GraphChoice, device: DeviceName, threads: int | None) -> None:
        super().__init__(graph, choice, device)
        torch = import_torch()
        if device == "cpu":
            # The profiling executor specializes a graph to the shapes it saw and falls back to an unoptimized
            # copy when they change, which a decode step's growing cache does every step (seq2seq engine, greedy
            # batch 1: 229 -> 526 tokens/s). On CPU it fuses nothing that would pay for that. Set before the
            # load: a loaded module keeps the executor it was given.
            torch._C._jit_set_profiling_executor(False)
        self.module = torchscript_module(choice.file, device, threads=threads)
        if device == "cpu":
            self.module = _cpu_fast_path(torch, self.module)
        self.threads = threads
        """Intra-op threads each call runs on (CPU; None: whatever torch has)."""
        self.torch = torch
        self._pinned: dict[str, "torch.Tensor"] = {}  # input name -> reusable pinned staging buffer

    @property
    def inline_safe(self) -> bool:
        # On CPU, libgomp keeps one team of spinning OpenMP threads per calling thread: alternating between
        # the event loop and the worker thread ran two teams against each other (digits CNN, c=1: 960 -> 400-730
        # req/s, CPU per request up to 2x).
        return self.device != "cpu"

    def _from_numpy(self, array: np.ndarray):
        if not array.flags.writeable:  # a view of a request body: torch wants writable memory
            array = array.copy()
        return self.torch.from_numpy(np.ascontiguousarray(array))  # a view, no copy

    def _to_device(self, name: str, array: np.ndarray):
        """CUDA: ``array`` staged through the pinned buffer kept for input ``name``, then copied asynchronously."""
        torch = self.torch
        buffer = self._pinned.get(name)
        if buffer is None or buffer.numel() < array.size or buffer.numpy().dtype != array.dtype:
            buffer = torch.from_numpy(np.empty(max(array.size, 1), dtype=array.dtype)).pin_memory()
            self._pinned[name] = buffer
        staged = buffer[: array.size].view(array.shape)
        staged.numpy()[...] = array  # one host copy into pinned memory, then an async copy to the device
        return staged.to(self.device, non_blocking=True)

    def narrow(self) -> TorchScriptRuntime | None:
        if self.device != "cpu" or (self.threads or 0) <= 1:
            return None
        one = copy.copy(self)  # the same module: torch's thread count is switched per call instead
        one.threads = 1
        return one

    def call(self, *arrays: Any) -> list[Any]:
        """On CPU numpy in and out, as ONNX Runtime's (views both ways, no copy), so that a step runner keeps its
        state in numpy on either CPU backend: a cache write is then one numpy assignment, not a torch op and its
        dispatch (seq2seq greedy batch 1: ~9% of the step runner's time went to those). On CUDA torch tensors on
        the device."""
        if self.device != "cpu":
            return self._forward(*arrays)
        return [t.numpy() for t in self._forward(*[self._from_numpy(a) for a in arrays])]

    def _forward(self, *tensors: Any) -> list[Any]:
        if self.threads and self.device == "cpu" and self.torch.get_num_threads() != self.threads:
            self.torch.set_num_threads(self.threads)
        with self.torch.inference_mode():
            result = self.module(*tensors)
        if isinstance(result, self.torch.Tensor):
            result = (result,)
        flat: list = []
        for r in result:  # char-LM style (logits, (h, c)) nests its state
            flat.extend(r if isinstance(r, (tuple, list)) else [r])
        return flat

    def run(self, inputs: Tensors) -> Tensors:
        if self.device == "cpu":
            return dict(zip(self.output_names, self.call(*[inputs[n] for n in self.input_names])))
        with self.torch.inference_mode():
            flat = self._forward(*[self._to_device(n, inputs[n]) for n in self.input_names])
            # .cpu() waits for the device once per output; the copies are queued back to back.
            return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, flat)}


def _cpu_fast_path(torch: Any, module: Any) -> Any:
    """``module`` on torch's Static Runtime, its frozen linear weights pre-transposed and contiguous (seq2seq
    decode step, one thread, engine: 0.53-0.59 -> 0.63-0.70 of ONNX Runtime's tokens/s). The JIT interpreter
    dispatches each op afresh and allocates every output; Static Runtime plans memory once and reuses it between
    calls. These are private torch APIs: for a graph they refuse, the module runs as the passes left it (same
    values). Convolution graphs are compute-bound and keep the interpreter (ResNet-18 at batch 32 ran ~10%
    slower on Static Runtime). GELU of rows runs on torch's own kernel (``_native_gelu``)."""
    if any(node.kind() == "aten::_convolution" for node in module.graph.nodes()):
        return module
    try:
        torch._C._jit_pass_transpose_frozen_linear(module.graph)
        _contiguous_constants(module.graph)
        _native_gelu(module.graph)
        return torch._C._jit_to_static_module(module._c)
    except (AttributeError, RuntimeError):
        return module


def _native_gelu(graph: Any) -> None:
    """Hand each GELU of an ``addmm`` (rows, 2-D: the seq2seq step's) a transposed view and transpose its answer
    back: aten sends only contiguous input to oneDNN, whose per-call cost dominates at decode-step sizes, and runs
    its own vectorized exact GELU on the rest (same formula, equal to float rounding). Seq2seq step graph alone,
    one thread: 0.94-0.97x the time at 4-32 rows, the same at 1 and 128. Other GELUs (the encoder's, on (B,S,F))
    keep oneDNN, faster at hundreds of rows."""
    for node in list(graph.findAllNodes("aten::gelu")):
        x = node.inputsAt(0)
        if x.node().kind() != "aten::addmm":
            continue
        with graph.insert_point_guard(node):
            node.replaceInput(0, graph.insertNode(graph.create("aten::t", [x])).output())
        back = graph.create("aten::t", [node.output()])
        back.insertAfter(node)
        node.output().replaceAllUsesWith(back.output())
        back.replaceInput(0, node.output())  # the line above re-pointed back's own input too


def _contiguous_constants(graph: Any) -> None:
    """Store each frozen tensor that tracing left as a strided view contiguous: ``addmm(b, x, weight.t())``
    (the seq2seq step's linear layers) freezes its weight as a transposed view, which MKL multiplies up to
    1.5x slower at 8 rows than the same weight laid out row-major. Values are unchanged (constants are
    never written)."""
    for node in graph.findAllNodes("prim::Constant"):
        if node.output().type().kind() == "TensorType" and not (value := node.output().toIValue()).is_contiguous():
            value = value.contiguous()
            node.t_("value", value)
            node.output().inferTypeFrom(value)


def open_runtime(
    graph: GraphSpec, directory: Path, *, backend: str, device: DeviceName, precision: str = "fp32",
    threads: int | None = None,
) -> GraphRuntime:
    """Open ``graph`` from ``directory`` with the preferred backend; raises ``BackendUnavailable``."""
    choice = choose_graph(graph.files, directory, backend=backend, device=device, precision=precision)
    if choice.backend == "onnx":
        return OnnxRuntime(graph, choice, device, threads)
    return TorchScriptRuntime(graph, choice, device, threads)
