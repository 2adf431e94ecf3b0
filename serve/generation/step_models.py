"""Step runners: a ``StepModel`` owns the recurrent / key-value state of every running row, in batch order. The
scheduler stages prompts (``stage``, ``prefill`` within a token budget, ``join_staged``: char-LM prefills all prompt
tokens but the last, seq2seq runs one batched encoder call), runs ``step(tokens) -> logits [B, V]`` and
``reorder(index, regroup)`` (finished rows leave, beams follow back-pointers; ``regroup=False``: rows moved only
within a request, so the seq2seq cross-attention state stays). ``Graph`` hides whether the state is numpy (on CPU,
either runtime) or torch (TorchScript on CUDA). The seq2seq runner lives in ``seq2seq_step``."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepserve.manifest import CharLMGraphContract, GraphSpec, Manifest, StepGraphContract
from deepserve.serve.runtime import GraphRuntime, TorchScriptRuntime, open_runtime

Array = Any  # np.ndarray; a torch.Tensor only for TorchScript on CUDA (on CPU both runtimes take numpy)
NARROW_ROWS = 64  # steps below it run on one thread (as fast as two here), leaving a core to Python
MAX_CHUNK = 32
"""Positions per budgeted prefill call: a lone row's position costs ~15 us, a row's in a wide call ~5.5 us, so a
token budget alone would let a lone long prompt stall the batch for milliseconds."""
CALL_TOKENS = 8  # what the prefill budget charges a call beyond its tokens: its fixed cost (~40 us) in tokens


class Graph:
    """One exported graph: ``run(*inputs) -> outputs`` in the manifest's order, plus the array ops the state
    needs (so that torch state never leaves torch and numpy state never leaves numpy)."""

    def __init__(self, fn: Callable[..., list[Array]], output_names: list[str], *, torch_device: str | None = None,
                 platform: str = "custom", runtime: GraphRuntime | None = None,
                 input_names: list[str] | None = None, narrow: Graph | None = None) -> None:
        self._fn, self.runtime, self.narrow = fn, runtime, narrow  # the runtime behind fn (None for a plain function)
        self.output_names = output_names
        self.input_names = input_names or []  # The manifest's input names, in call order.
        self.torch_device, self.platform = torch_device, platform
        if torch_device is not None:
            import torch

            self._torch = torch

    @classmethod
    def open(cls, spec: GraphSpec, directory: Path, *, backend: str, device: str, precision: str = "fp32",
             threads: int | None = None, steps: bool = False) -> Graph:
        """``steps``: a step graph, also opened on one thread for ``rows`` (an encoder's copy: an idle ORT session)."""
        rt = open_runtime(spec, directory, backend=backend, device=device,  # type: ignore[arg-type]
                          precision=precision, threads=threads)
        return cls.of(rt, rt.narrow() if steps else None)

    @classmethod
    def of(cls, rt: GraphRuntime, narrow: GraphRuntime | None = None) -> Graph:
        on_torch = isinstance(rt, TorchScriptRuntime) and rt.device != "cpu"  # on CPU both runtimes take numpy
        return cls(rt.call, rt.output_names, torch_device=rt.device if on_torch else None, platform=rt.platform,
                   runtime=rt, input_names=rt.input_names, narrow=cls.of(narrow) if narrow else None)

    def __call__(self, *inputs: Array) -> list[Array]:
        return self._fn(*inputs)

    def rows(self, rows: int) -> Graph:
        """The graph for a step of ``rows`` rows: below NARROW_ROWS, ``narrow`` (the same graph on one CPU thread)."""
        return self.narrow if self.narrow is not None and rows < NARROW_ROWS else self

    # ---- array ops on the graph's native arrays ---------------------------------------------------------

    def asarray(self, a: np.ndarray) -> Array:
        if self.torch_device is None:
            return a
        return self._torch.from_numpy(np.ascontiguousarray(a)).to(self.torch_device)

    def numpy(self, x: Array) -> np.ndarray:
        if self.torch_device is None:
            return x
        return x.detach().float().cpu().numpy()

    def take(self, x: Array, index: np.ndarray, axis: int) -> Array:
        if self.torch_device is None:
            return np.take(x, index, axis=axis)
        return x.index_select(axis, self._torch.from_numpy(index).to(x.device))

    def cat(self, xs: list[Array], axis: int) -> Array:
        if self.torch_device is None:
            return np.concatenate(xs, axis=axis)
        return self._torch.cat(xs, dim=axis)

    def full(self, shape: tuple[int, ...], value: Any, like: Array) -> Array:
        if self.torch_device is None:
            return np.full(shape, value, dtype=like.dtype)
        return self._torch.full(shape, value, dtype=like.dtype, device=like.device)


class StepModel(ABC):
    vocab_size: int
    eos_id: int | None
    rows: int = 0

    @abstractmethod
    def join(self, prompts: list[list[int]], copies: list[int]) -> np.ndarray:
        """Append ``copies[i]`` rows for prompt i (in order); return their first input tokens (int64)."""

    @abstractmethod
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) int64 -> logits (B, V) float32; advances every row by one token."""

    @abstractmethod
    def reorder(self, index: np.ndarray, regroup: bool = True) -> None:
        """Keep rows ``index`` (int64, may repeat) in that order."""

    @property
    def platform(self) -> str:
        return "custom"

    staged: list[Staged] = []  # prompts staged, not joined or dropped yet, in order (each model sets its own)

    def stage(self, prompts: list[list[int]]) -> None:
        self.staged = [*self.staged, *(Staged(p) for p in prompts)]

    def prefill(self, budget: int) -> list[int]:
        """Spend about ``budget`` prompt tokens on the staged prompts; return the positions of those ready to
        join. This default leaves the work to ``join``: every staged prompt is ready at once."""
        return list(range(len(self.staged)))

    def join_staged(self, ready: list[int], copies: list[int]) -> np.ndarray:
        """``join`` the staged prompts at ``ready`` (``copies[i]`` rows each); a failed join leaves them staged."""
        first = self.join([self.staged[i].prompt for i in ready], copies)
        self.unstage(ready)
        return first

    def unstage(self, positions: list[int]) -> None:
        """Take the staged prompts at ``positions`` off the stage."""
        gone = set(positions)
        self.staged = [p for i, p in enumerate(self.staged) if i not in gone]


@dataclasses.dataclass
class Staged:
    """A staged prompt, how many of its tokens are left to feed, and the model's state after the others."""
    prompt: list[int]
    left: int = 0  # char-LM: at first all but the last (the first step takes it); state: each (L,1,H)
    state: list[Array] = dataclasses.field(default_factory=list)


def is_identity(index: np.ndarray, rows: int) -> bool:
    """Whether keeping rows ``index`` changes nothing (all rows, in their order)."""
    return len(index) == rows and bool(np.all(index == np.arange(rows)))


def expand_copies(copies: list[int]) -> np.ndarray:
    """``[2, 1]`` -> ``[0, 0, 1]``: the new row index of each copy of each joining prompt."""
    return np.repeat(np.arange(len(copies)), copies)


class CharLMStepModel(StepModel):
    """Char-LSTM / GRU graph: tokens (B,T), h (and c) (L,B,H) -> logits, h_out (, c_out). The ``prefill`` graph
    (logits (B,V) of the last position) serves prompts and steps alike; older artifacts have ``step`` (logits
    (B,T,V)). Staged prompts are prefilled in chunks, all rows of a call by the same number of positions (an RNN
    has no mask nor position): prompts with as many tokens left share a call, whenever they were staged."""

    def __init__(self, graph: Graph, num_layers: int, hidden_size: int, n_state: int, vocab_size: int,
                 last_only: bool = False) -> None:
        self.graph, self.last_only = graph, last_only
        self.num_layers, self.hidden_size, self.n_state = num_layers, hidden_size, n_state
        self.vocab_size, self.eos_id, self.rows = vocab_size, None, 0
        self.state: list[Array] = [self._zeros(0) for _ in range(n_state)]  # each (L,B,H)

    @property
    def platform(self) -> str:
        return self.graph.platform

    def _zeros(self, batch: int) -> Array:
        return self.graph.asarray(np.zeros((self.num_layers, batch, self.hidden_size), np.float32))

    def stage(self, prompts: list[list[int]]) -> None:
        zero = [self._zeros(1) for _ in range(self.n_state)]  # shared: a call returns new arrays, never writes these
        self.staged = [*self.staged, *(Staged(p, len(p) - 1, zero) for p in prompts)]

    def prefill(self, budget: int) -> list[int]:
        """``budget`` tokens (rows x positions, ``CALL_TOKENS`` a call), one call of ``MAX_CHUNK`` positions at most per
        group of prompts with as many tokens left, oldest first: a long prompt keeps its pace beside short ones."""
        self._feed(self.staged, budget)
        return [i for i, s in enumerate(self.staged) if s.left <= 0]

    def _feed(self, staged: list[Staged], budget: int) -> None:
        groups: dict[int, list[Staged]] = {}
        for s in (s for s in staged if s.left > 0):
            groups.setdefault(min(MAX_CHUNK, s.left), []).append(s)
        for left, group in groups.items():
            if budget > 0:  # as many rows as the budget pays for (one at least, then fewer positions)
                rows, n = group[: max(1, budget // left)], min(left, budget)
                self._advance(rows, n)
                budget -= n * len(rows) + CALL_TOKENS

    def _advance(self, rows: list[Staged], n: int) -> None:
        """Feed the staged prompts ``rows`` (each with ``n`` tokens left or more) their next ``n`` tokens."""
        g = self.graph.rows(len(rows))
        tokens = np.asarray([s.prompt[-1 - s.left:][:n] for s in rows], np.int64)  # (R,n)
        out = g(g.asarray(tokens), *(g.cat([s.state[k] for s in rows], 1) for k in range(self.n_state)))
        for r, s in enumerate(rows):
            s.left, s.state = s.left - n, [new[:, r: r + 1] for new in out[1:]]

    def join(self, prompts: list[list[int]], copies: list[int]) -> np.ndarray:
        """``prompts`` staged, prefilled without a budget (one call per distinct length) and joined."""
        mine = list(range(len(self.staged), len(self.staged) + len(prompts)))
        self.stage(prompts)
        while any(self.staged[i].left > 0 for i in mine):
            self._feed([self.staged[i] for i in mine], 1 << 30)
        return self.join_staged(mine, copies)

    def join_staged(self, ready: list[int], copies: list[int]) -> np.ndarray:
        rows = [self.staged[ready[i]] for i in expand_copies(copies)]
        self.state = [self.graph.cat([old, *(s.state[k] for s in rows)], 1) for k, old in enumerate(self.state)]
        self.rows += len(rows)
        self.unstage(ready)
        return np.asarray([s.prompt[-1] for s in rows], np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        g = self.graph.rows(len(tokens))
        out = g(g.asarray(tokens.reshape(-1, 1)), *self.state)
        self.state = out[1:]
        logits = g.numpy(out[0])
        return logits if self.last_only else logits[:, 0, :]  # (B,V)

    def reorder(self, index: np.ndarray, regroup: bool = True) -> None:
        if is_identity(index, self.rows):
            return
        self.state = [self.graph.take(s, index, 1) for s in self.state]
        self.rows = len(index)


def open_step_model(manifest: Manifest, directory: Path, *, backend: str, device: str, precision: str = "fp32",
                    threads: int | None = None, eos_id: int | None = None) -> StepModel:
    """The step runner for a char-lm or seq2seq artifact."""
    kw = dict(backend=backend, device=device, precision=precision, threads=threads)
    if manifest.task == "char-lm":
        lm = CharLMGraphContract.of(manifest)
        graph = Graph.open(manifest.graphs["prefill" if lm.prefill else "step"], directory, steps=True, **kw)
        return CharLMStepModel(graph, lm.layers, lm.hidden, len(lm.state), lm.vocab_size, last_only=lm.prefill)
    if manifest.task == "seq2seq":
        from deepserve.serve.generation.seq2seq_step import Seq2SeqStepModel  # it builds on this module

        c = StepGraphContract.of(manifest)  # refuses other cache layouts (asking for a re-export) and missing names
        return Seq2SeqStepModel(Graph.open(manifest.graphs["encode"], directory, **kw),
                                Graph.open(manifest.graphs["decode_step"], directory, steps=True, **kw),
                                c if eos_id is None else dataclasses.replace(c, eos_id=eos_id))
    raise ValueError(f"task {manifest.task!r} is not a generation task")
