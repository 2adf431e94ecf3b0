"""The image-classification servable: instances of one graph runtime, each behind its own batcher.

``infer`` takes named tensors (the v2 protocol), validated against the manifest's graph spec; an ``images``
input of BYTES holds encoded images and is decoded and preprocessed like ``classify``'s. ``classify``
(TorchServe-style predictions) decodes images in the shared preprocessing pool, runs them as one request
and returns the top-k labels with softmax probabilities.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepserve.manifest import GraphSpec, Manifest, TensorSpec
from deepserve.serve.backends import DeviceName, cpu_threads
from deepserve.serve.batcher import Batcher
from deepserve.serve.errors import BadRequest, NotReady
from deepserve.serve.preprocess import DEFAULT_MAX_PIXELS, ImagePreprocessor
from deepserve.serve.runtime import GraphRuntime, open_runtime
from deepserve.serve.servable import V2_DATATYPES, Servable
from deepserve.serve.settings import ModelSettings

Tensors = dict[str, np.ndarray]
RuntimeFactory = Callable[[GraphSpec, Path, ModelSettings, DeviceName, int], GraphRuntime]

_pool: ThreadPoolExecutor | None = None
INLINE_DECODE_PIXELS = 64 * 64
"""Requests whose images hold at most this many pixels in all are decoded on the event loop (tens of µs)."""


def preprocess_pool() -> ThreadPoolExecutor:
    """The thread pool shared by every model for image decoding (Pillow releases the GIL while decoding)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="deepserve-decode")
    return _pool


def default_runtime_factory(graph: GraphSpec, directory: Path, settings: ModelSettings, device: DeviceName,
                            threads: int) -> GraphRuntime:
    return open_runtime(graph, directory, backend=settings.backend, device=device, precision=settings.precision,
                        threads=threads)


def spec_text(spec: TensorSpec) -> str:
    return f"{V2_DATATYPES[spec.dtype]} {spec.v2_shape}"


class ClassificationServable(Servable):
    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        settings: ModelSettings,
        device: DeviceName,
        *,
        runtime_factory: RuntimeFactory = default_runtime_factory,
        metrics: Any = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.manifest = manifest
        self.directory = Path(directory)
        self.settings = settings
        self.device = device
        self.ready = False
        self.reason = "not started"
        self.runtime_factory = runtime_factory
        self.metrics = metrics
        self.graph = manifest.graphs["model"]
        self.input_spec = {t.name: t for t in self.graph.inputs}
        # built once, not per request: each input's spec, dtype and, when every dimension but the batch's is
        # fixed, the shape after the batch dimension (one tuple comparison per request)
        self._input_checks = [(t, np.dtype(t.dtype), _fixed_tail(t.shape)) for t in self.graph.inputs]
        self.image_input = self.graph.inputs[0].name
        self.labels = list(manifest.labels)
        self.preprocessor = ImagePreprocessor.from_manifest(manifest.preprocessing, max_pixels=max_pixels)
        self.runtimes: list[GraphRuntime] = []
        self.batchers: list[Batcher] = []
        self._executors: list[ThreadPoolExecutor] = []

    @property
    def platform(self) -> str:
        return self.runtimes[0].platform if self.runtimes else "deepserve"

    @property
    def name(self) -> str:
        return f"{self.manifest.name}/{self.manifest.version}"

    async def start(self) -> None:
        s = self.settings
        threads = s.intra_op_threads or cpu_threads(s.instances)
        for i in range(s.instances):
            # One worker thread per instance: its batches run there, one at a time, off the event loop.
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"deepserve-{self.manifest.name}-{i}")
            self._executors.append(executor)
            runtime = await asyncio.get_running_loop().run_in_executor(
                executor, self.runtime_factory, self.graph, self.directory, s, self.device, threads)
            self.runtimes.append(runtime)
            on_batch = None
            if self.metrics is not None:
                on_batch = self.metrics.batch_hook(self.manifest.name, str(self.manifest.version))
            batcher = Batcher(runtime.run, max_batch_size=s.max_batch_size, max_queue_delay_ms=s.max_queue_delay_ms,
                              max_queue_size=s.max_queue_size, executor=executor, name=self.name,
                              on_batch=on_batch, max_queue_wait_ms=s.max_queue_wait_ms,
                              inline_below_ms=s.inline_batch_ms if getattr(runtime, "inline_safe", False) else 0.0)
            batcher.start()
            self.batchers.append(batcher)
        if self.metrics is not None:
            self.metrics.track_queue_depth(self.manifest.name, str(self.manifest.version),
                                           lambda: sum(b.depth for b in self.batchers))

    async def warmup(self) -> None:
        """Run every batch size the batchers can form through every instance (as Triton's model warm-up does): a
        runtime's first batch of a new shape plans and allocates for it, which the first burst after a start or a
        scale-up would otherwise pay for in its tail. The largest goes first (the runtime's memory grows once, to
        its full size), the rest in rising order: the batcher's cost per row, which falls only gradually, then
        ends at a full batch's, so the first burst's batches run where later bursts' do (inline or on the
        worker thread); ending on one-row batches sent a tiny model's first burst to the worker thread."""
        largest = self.settings.max_batch_size
        for rows in [largest, *range(1, largest)]:
            dummy = {t.name: np.zeros([rows] + [d if isinstance(d, int) else 1 for d in t.shape[1:]], dtype=t.dtype)
                     for t in self.graph.inputs}
            for batcher in self.batchers:
                await batcher.submit(dummy)
        await self.decode_images([self.preprocessor.blank_png()])  # the image path's first call too
        self.ready, self.reason = True, None

    async def stop(self) -> None:
        self.ready, self.reason = False, "stopped"
        await asyncio.gather(*(b.stop() for b in self.batchers))
        for executor in self._executors:
            executor.shutdown(wait=False)
        # Drop the graphs: an unloaded or replaced version frees its memory even while something (its queue
        # depth gauge, a late caller) still holds this object.
        self.batchers, self.runtimes, self._executors = [], [], []

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["parameters"]["labels"] = len(self.labels)
        p = self.preprocessor  # what a client needs to show or prepare the input as the model sees it
        meta["parameters"]["preprocessing"] = {"channels": p.channels, "height": p.height, "width": p.width,
                                               "color_mode": p.color_mode, "resize": p.resize,
                                               "mean": list(p.mean), "std": list(p.std)}
        return meta

    def _deadline(self, deadline: float | None) -> float:
        return deadline if deadline is not None else time.monotonic() + self.settings.request_timeout_s

    def _batcher(self) -> Batcher:
        if not self.ready and self.reason == "stopped":
            raise NotReady(f"model {self.name} is stopping")
        if len(self.batchers) == 1:
            return self.batchers[0]
        return min(self.batchers, key=lambda b: (b.depth, b.in_flight > 0))  # fewest waiting, idle ones first

    def check_admission(self, deadline: float | None = None) -> None:
        """Shed (429) before the body is read when even a one-row request would wait too long."""
        self._batcher().check_admission(1, 1, self._deadline(deadline))

    async def _submit(self, inputs: Tensors, deadline: float | None) -> Tensors:
        return await self._batcher().submit(inputs, deadline=self._deadline(deadline))

    def _expected(self) -> str:
        return ", ".join(f"{t.name} ({spec_text(t)})" for t in self.graph.inputs)

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        if inputs.keys() != self.input_spec.keys():
            self._name_problem(inputs)
        rows = -1
        for spec, dtype, tail in self._input_checks:
            array = inputs[spec.name]
            if array.dtype != dtype:
                raise BadRequest(f"input {spec.name!r}: datatype {_v2_name(array.dtype)} does not match the expected "
                                 f"{spec_text(spec)}")
            shape = array.shape
            if tail is not None:
                shape_ok = len(shape) > 0 and shape[0] >= 1 and shape[1:] == tail
            else:
                shape_ok = array.ndim == len(spec.shape) and shape[0] >= 1 and all(
                    not isinstance(d, int) or d == a for d, a in zip(spec.shape, shape))
            if not shape_ok:
                raise BadRequest(f"input {spec.name!r}: shape {list(array.shape)} does not match the expected "
                                 f"{spec_text(spec)}")
            if dtype.kind == "f" and not all_finite(array):  # would answer null logits
                raise BadRequest(f"input {spec.name!r} holds NaN or infinite values; every value must be finite")
            if rows not in (-1, array.shape[0]):
                raise BadRequest(f"inputs disagree on the batch size: "
                                 f"{sorted({inputs[s.name].shape[0] for s in self.graph.inputs})}")
            rows = array.shape[0]

    def _name_problem(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise the 400 for inputs whose names are not the graph's (unknown first, then missing)."""
        for name in inputs:
            if name not in self.input_spec:
                raise BadRequest(f"unknown input {name!r} for model {self.manifest.name}; "
                                 f"expected {self._expected()}")
        missing = next(spec.name for spec in self.graph.inputs if spec.name not in inputs)
        raise BadRequest(f"missing input {missing!r} for model {self.manifest.name}; expected {self._expected()}")

    async def decode_images(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> ``[N, C, H, W]`` float32.

        Headers are read here (cheap: size and format checks); small images are decoded here too, since a
        thread hop costs more than decoding a few thousand pixels, and bigger ones in the preprocessing pool.
        """
        if not images:
            raise BadRequest("no image given")
        opened = [self.preprocessor.open(data) for data in images]
        pixels = sum(image.width * image.height for image in opened)

        def work() -> np.ndarray:
            if len(opened) == 1:  # the usual request; np.stack of one array costs more than the view
                return self.preprocessor.to_array(opened[0])[None]
            return np.stack([self.preprocessor.to_array(image) for image in opened])

        if pixels <= INLINE_DECODE_PIXELS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(preprocess_pool(), work)

    async def infer(self, inputs: dict[str, np.ndarray], *, deadline: float | None = None) -> Tensors:
        """Named tensors in, named tensors out; an ``images`` input of BYTES holds encoded images."""
        encoded = inputs.get(self.image_input)
        if encoded is not None and encoded.dtype == object:
            if encoded.ndim == 2 and encoded.shape[1] == 1:
                encoded = encoded[:, 0]
            if encoded.ndim != 1:
                raise BadRequest(f"input {self.image_input!r}: BYTES images need shape [N] or [N, 1], "
                                 f"got {list(encoded.shape)}")
            inputs = dict(inputs)
            inputs[self.image_input] = await self.decode_images(list(encoded))
        self._check_inputs(inputs)
        return await self._batcher().submit(inputs, deadline=self._deadline(deadline))  # no frame of its own

    async def classify(self, images: list[bytes], top_k: int = 5, deadline: float | None = None
                       ) -> list[list[dict[str, Any]]]:
        """Top-k ``{label, probability}`` for each encoded image, most probable first."""
        pixels = await self.decode_images(images)
        logits = (await self._submit({self.image_input: pixels}, deadline))[self.graph.outputs[0].name]
        return top_k_labels(logits, self.labels, top_k)


def _fixed_tail(shape: tuple[int | str, ...]) -> tuple[int, ...] | None:
    """The dimensions after a variable batch dimension when all of them are fixed; None otherwise."""
    if not shape or isinstance(shape[0], int) or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return tuple(shape[1:])  # type: ignore[arg-type]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


SMALL_LOGITS = 64
"""Up to this many logits in all, ``top_k_labels`` works on Python floats: a few µs, where numpy's calls cost tens."""
PARTITION_LOGITS = 2048
"""From this many logits in all, the top k are found by ``argpartition`` and a sort of k, not by sorting rows."""


def top_k_labels(logits: np.ndarray, labels: list[str], k: int) -> list[list[dict[str, Any]]]:
    """``[N, L]`` logits -> each row's k most probable ``{label, probability}``; ties keep index order."""
    if logits.size <= SMALL_LOGITS:
        return [_top_k_row(row, labels, k) for row in logits.tolist()]
    probs = softmax(logits)
    k = min(k, probs.shape[-1])
    rows = np.arange(len(probs))[:, None]
    order = _top_k_indices(probs, k, rows)
    return [[{"label": labels[i] if i < len(labels) else str(i), "probability": p} for i, p in zip(idx, top)]
            for idx, top in zip(order.tolist(), probs[rows, order].tolist())]


def _top_k_row(row: list[float], labels: list[str], k: int) -> list[dict[str, Any]]:
    """``softmax`` and the stable sort of ``top_k_labels`` for one row, in Python floats (float64 too)."""
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    probs = [e / total for e in exps]
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:k]  # reverse=True stays stable
    return [{"label": labels[i] if i < len(labels) else str(i), "probability": probs[i]} for i in order]


def _top_k_indices(probs: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """``np.argsort(-probs, axis=-1, kind="stable")[:, :k]``; ``rows`` is ``arange(N)[:, None]``."""
    neg = -probs
    if probs.size < PARTITION_LOGITS or not 0 < 4 * k < probs.shape[-1]:
        return np.argsort(neg, axis=-1, kind="stable")[:, :k]
    part = np.argpartition(neg, (k - 1, k), axis=-1)
    # The k smallest are the same set as the stable sort's only if the k-th is below the (k+1)-th; on a tie
    # (or NaN) the stable order picks among the tied values: sort whole rows then.
    edge = neg[rows, part[:, k - 1 : k + 1]]
    if not np.all(edge[:, 0] < edge[:, 1]):
        return np.argsort(neg, axis=-1, kind="stable")[:, :k]
    picked = np.sort(part[:, :k], axis=-1)  # index order, so the stable sort below breaks ties by index
    return picked[rows, np.argsort(neg[rows, picked], axis=-1, kind="stable")]


FINITE_BY_SUM = 16384
"""Up to this many values, ``all_finite`` tests their sum (~1 µs) instead of each value (~5 µs of numpy calls);
past it the element-wise test is the faster (vectorized) one."""


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in a floating-point ``array``. Any NaN or infinity makes the sum NaN or infinite, so a
    finite sum proves them absent; a non-finite sum (or finite values that overflow when added) takes the
    element-wise test."""
    if array.size <= FINITE_BY_SUM and math.isfinite(np.add.reduce(array, axis=None)):
        return True
    return bool(np.isfinite(array).all())


def _v2_name(dtype: np.dtype) -> str:
    return V2_DATATYPES.get(np.dtype(dtype).name, np.dtype(dtype).name.upper())
