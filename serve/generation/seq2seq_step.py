"""The seq2seq step runner: batched encoder call on join, one ``decode_step`` per step over per-layer key/value
caches, with the cross-attention K/V kept once per source and shared by that source's rows (beams).
See ``step_models`` for the ``StepModel`` interface the scheduler drives."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from deepserve.manifest import KVUpdate, StepGraphContract, cache_names
from deepserve.serve.generation.step_models import Array, Graph, StepModel, expand_copies, is_identity

SLOTS = 16  # empty cache slots added at a time (KVUpdate.SLOT): one cache copy per 16 steps, not one per step

class Seq2SeqStepModel(StepModel):
    """``encode`` + ``decode_step`` graphs with a left-padded key/value cache (docs/ARCHITECTURE.md).

    The state is one tensor per decoder layer and kind, batch on axis 0 of each. The cross-attention K/V
    (``cross_k_i``, ``cross_v_i`` [N,H,S,Dh]) are kept once per source, not per row: the beams or samples of
    one request share them. When the rows are G contiguous rows per source, in source order (every request at
    the same width: all greedy, or all beams at full width), ``decode_step`` gets them as they are and each
    source's rows read its K/V once as G queries; otherwise it gets a per-row copy (``cross``), made again
    only when the rows' sources change. Each step's K/V is written into slot ``fill`` of the caches, which grow
    SLOTS empty slots at a time (older ``KVUpdate.CONCAT`` graphs return it as the last slot of ``present_k_i``)."""

    def __init__(self, encode: Graph, decode: Graph, c: StepGraphContract) -> None:
        self.encode, self.decode = encode, decode
        self.vocab_size, self.pad_id, self.bos_id, self.eos_id = c.vocab_size, c.pad_id, c.bos_id, c.eos_id
        self.layers, self.heads, self.head_dim = layers, heads, head_dim = c.layers, c.heads, c.head_dim
        self.suppress = np.asarray(sorted({c.pad_id, c.bos_id} - {c.eos_id}), np.int64)
        self.rows = 0
        self.slot = c.kv_update is KVUpdate.SLOT
        self.cross_names, self.past_names = cache_names("cross", layers), cache_names("past", layers)
        self.new_names = cache_names("new" if self.slot else "present", layers)
        empty = decode.asarray(np.zeros((0, heads, 0, head_dim), np.float32))
        self.cross_src: list[Array] = [empty] * (2 * layers)  # cross_names order, each (N,H,S,Dh), one per source
        self.src_pad_src = decode.asarray(np.zeros((0, 0), bool))  # (N,S) True = pad
        self.row_src = np.zeros(0, np.int64)  # (B,) each row's source
        self._rows_cache: tuple[list[Array], Array] | None = None  # per-row cross K/V and src_pad_mask
        self._grouped: bool | None = None  # whether rows are G contiguous rows per source, in source order
        self.past: list[Array] = [empty] * (2 * layers)  # past_names order, each (B,H,P,Dh)
        self._buffers: list[list[np.ndarray | None]] = [[None, None] for _ in range(2 * layers)]  # see _take_rows
        self.past_pad = np.zeros((0, 0), bool)  # (B,P) True = empty slot; numpy, converted per step
        self.fill = 0  # cache slots written: the next K/V goes to slot ``fill`` (P - fill slots are spare)
        self.positions = np.zeros(0, np.int64)  # (B,)

    @property
    def platform(self) -> str:
        return self.decode.platform

    @property
    def sources(self) -> int:
        return len(self.src_pad_src)

    def _per_row(self) -> tuple[list[Array], Array]:
        """The cross K/V and src_pad_mask of every row (B on axis 0), copied once per change of ``row_src``."""
        if self._rows_cache is None:
            if len(self.row_src) == self.sources and bool(np.all(self.row_src == np.arange(self.sources))):
                self._rows_cache = (self.cross_src, self.src_pad_src)  # one row per source: no copy
            else:
                take = self.decode.take
                self._rows_cache = ([take(x, self.row_src, 0) for x in self.cross_src],
                                    take(self.src_pad_src, self.row_src, 0))
        return self._rows_cache

    @property
    def cross(self) -> list[Array]:
        """Per-row cross K/V (cross_names order, each (B,H,S,Dh))."""
        return self._per_row()[0]

    def _is_grouped(self) -> bool:
        if self._grouped is None:
            n, b = self.sources, len(self.row_src)
            self._grouped = 0 < n <= b and b % n == 0 and bool(np.all(self.row_src == np.arange(b) // (b // n)))
        return self._grouped

    def join(self, prompts: list[list[int]], copies: list[int]) -> np.ndarray:
        g = self.decode
        n, s = len(prompts), max(len(p) for p in prompts)
        src = np.asarray([p + [self.pad_id] * (s - len(p)) for p in prompts], np.int64).reshape(n, s)
        src_pad = src == self.pad_id
        # both graphs come from the same backend and device, so encoder outputs feed the decoder as they are
        out = dict(zip(self.encode.output_names, self.encode(g.asarray(src), g.asarray(src_pad))))
        cross = [out[name] for name in self.cross_names]  # each (n,H,s,Dh): one per source, never per copy
        rep = expand_copies(copies)
        m = len(rep)
        S = max(s, self.src_pad_src.shape[1])
        self.cross_src = [g.cat([self._pad_axis(old, S, 2, 0.0), self._pad_axis(new, S, 2, 0.0)], 0)
                          for old, new in zip(self.cross_src, cross)]
        self.src_pad_src = g.cat([self._pad_axis(self.src_pad_src, S, 1, True),
                                  self._pad_axis(g.asarray(src_pad), S, 1, True)], 0)
        self.row_src = np.concatenate([self.row_src, self.sources - n + rep])
        self._rows_cache, self._grouped = None, None
        # new rows have no history: all P cache slots are empty (left padding)
        P = self.past_pad.shape[1]
        zeros = g.full((m, self.heads, P, self.head_dim), 0.0, self.past[0])
        self.past = [g.cat([x, zeros], 0) for x in self.past]
        self.past_pad = np.concatenate([self.past_pad, np.ones((m, P), bool)], 0)
        self.positions = np.concatenate([self.positions, np.zeros(m, np.int64)])
        self.rows += m
        return np.full(m, self.bos_id, np.int64)

    def _pad_axis(self, x: Array, S: int, axis: int, value: Any) -> Array:
        """Right-pad ``axis`` to S (a source axis: cross-attention masks the padding; a cache's: empty slots)."""
        if x.shape[axis] == S:
            return x
        shape = (*x.shape[:axis], S - x.shape[axis], *x.shape[axis + 1 :])
        return self.decode.cat([x, self.decode.full(shape, value, x)], axis)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        g = self.decode
        cross, src_pad = (self.cross_src, self.src_pad_src) if self._is_grouped() else self._per_row()
        feeds = {"tokens": g.asarray(tokens.reshape(-1, 1)), "positions": g.asarray(self.positions),
                 "src_pad_mask": src_pad, "past_pad_mask": g.asarray(self.past_pad),
                 **dict(zip(self.cross_names, cross)), **dict(zip(self.past_names, self.past))}
        out = dict(zip(g.output_names, g.rows(len(tokens))(*[feeds[name] for name in g.input_names])))
        self._write_slot([out[name] if self.slot else out[name][:, :, -1:] for name in self.new_names])
        self.positions += 1
        logits = g.numpy(out["logits"])
        logits[:, self.suppress] = -np.inf  # pad and BOS are never outputs
        return logits

    def _write_slot(self, new: list[Array]) -> None:
        """Write this step's K/V (each (B,H,1,Dh)) into slot ``fill`` of the caches, SLOTS more slots when full."""
        if self.fill == self.past_pad.shape[1]:
            self.past = [self._grown(i, x) for i, x in enumerate(self.past)]
            self.past_pad = np.concatenate([self.past_pad, np.ones((self.rows, SLOTS), bool)], 1)
        for x, n in zip(self.past, new):
            x[:, :, self.fill] = n[:, :, 0]
        self.past_pad[:, self.fill] = False
        self.fill += 1

    def _keep_sources(self, kept: np.ndarray) -> None:
        """Keep sources ``kept`` (in that order) and trim the source axis to the longest of them. The cross K/V
        and the source pad mask change together: a mask and K/V that disagree on the sources would hand the next
        request another request's source (and a stale one a shape the graph refuses)."""
        g = self.decode
        same = is_identity(kept, self.sources)
        src_pad = self.src_pad_src if same else g.take(self.src_pad_src, kept, 0)
        keep = int((~g.numpy(src_pad).astype(bool)).any(axis=0).nonzero()[0].max(initial=-1)) + 1
        if not same or keep < src_pad.shape[1]:
            self.cross_src = [g.take(x[:, :, :keep], kept, 0) for x in self.cross_src]
        self.src_pad_src = src_pad[:, :keep]

    def _take_rows(self, slot: int, x: Array, index: np.ndarray) -> Array:
        """``x`` rows ``index``; on numpy into one of two buffers kept per cache tensor (the one ``x`` is not in)."""
        if self.decode.torch_device is not None:
            return self.decode.take(x, index, 0)
        # mode="clip": with the default "raise", numpy gathers into a temporary and copies that into ``out``
        return np.take(x, index, axis=0, out=_room(self._buffers[slot], (len(index), *x.shape[1:]), x), mode="clip")

    def _grown(self, slot: int, x: Array) -> Array:
        """Cache ``x`` (B,H,fill,Dh) with SLOTS more empty slots (zeros: masked, yet finite for the att @ V)."""
        if self.decode.torch_device is not None:
            return self._pad_axis(x, self.fill + SLOTS, 2, 0.0)
        out = _room(self._buffers[slot], (len(x), self.heads, self.fill + SLOTS, self.head_dim), x)
        out[:, :, : self.fill], out[:, :, self.fill :] = x, 0.0
        return out

    def _move_rows_in_place(self, index: np.ndarray) -> None:
        """Row i of every cache becomes row ``index[i]``: each changed row copied once (its written slots) when no row
        still has to read it, one row of a cycle saved first. Nothing else holds these arrays."""
        src = {d: s for d, s in enumerate(index.tolist()) if d != s}
        readers = Counter(s for s in src.values() if s in src)
        ready, fill, saved = [d for d in src if not readers[d]], self.fill, {}
        while src:
            if not ready:  # only cycles left: save one row, which then no longer waits for its reader
                d = next(iter(src))
                saved[d], ready = [x[d, :, :fill].copy() for x in self.past], [d]
            d = ready.pop()
            s = src.pop(d)
            for i, x in enumerate(self.past):
                x[d, :, :fill] = saved[s][i] if s in saved else x[s, :, :fill]
            readers[s] -= 1
            if s in src and not readers[s]:
                ready.append(s)

    def reorder(self, index: np.ndarray, regroup: bool = True) -> None:
        if is_identity(index, self.rows):  # e.g. every beam continued its own row: no cache copy
            return
        g = self.decode
        pad = self.past_pad[index]
        # drop cache columns that no remaining row uses (the oldest rows may have left)
        used = ~pad.all(axis=0)
        first = int(np.argmax(used)) if used.any() else pad.shape[1]
        if not regroup and not first and len(index) == self.rows and g.torch_device is None:
            self._move_rows_in_place(index)  # beams follow their parents: most rows stay where they are
        else:
            self.past = [self._take_rows(i, x[:, :, first:] if first else x, index) for i, x in enumerate(self.past)]
        self.past_pad, self.fill = pad[:, first:], max(self.fill - first, 0)
        self.positions = self.positions[index]
        row_src = self.row_src[index]
        if regroup:
            # keep the sources some row still reads, numbered in row order
            kept, first_row, row_src = np.unique(row_src, return_index=True, return_inverse=True)
            order = np.argsort(first_row, kind="stable")
            kept, row_src = kept[order], np.argsort(order)[row_src]
            self._keep_sources(kept)
        if regroup or not np.array_equal(row_src, self.row_src):
            self.row_src = row_src.astype(np.int64, copy=False)
            self._rows_cache, self._grouped = None, None
        self.rows = len(index)


def _room(store: list[np.ndarray | None], shape: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """A ``shape`` view of the first reused buffer in ``store`` that ``x`` (the source of the copy about to fill
    it) is not in, replaced by a larger one (room to grow a few steps) when too small: a fresh multi-megabyte
    array per step costs more in page faults than the copy."""
    k = next(i for i, b in enumerate(store) if b is None or not np.may_share_memory(b, x))
    size = math.prod(shape)  # np.prod of a short tuple costs ~3 us, called per cache per step
    if store[k] is None or store[k].size < size:
        store[k] = np.empty(size + size // 4, x.dtype)
    return store[k][:size].reshape(shape)
