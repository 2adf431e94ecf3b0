"""Scenario 4, model level: eager PyTorch vs TorchScript vs ONNX Runtime fp32 / int8, latency at batch 1, 8, 64
for every model's graphs, in process, with the server's own runtime classes and thread settings.

Eager runs the exporter's wrapper module (the very function that was traced), built from the checkpoint.
TorchScript and ONNX Runtime go through ``deepserve.serve.runtime.open_runtime``, as the server opens them.
Generator graphs are fed what one decoding step sees: char-LM one token per row; seq2seq ``encode`` with
32 source tokens, ``decode_step`` with 32 source tokens and 16 cached target positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Plan
from benchmarks.models import MODELS, manifest
from benchmarks.results import Plot, Report, Table
from deepserve.manifest import GraphSpec

RUNTIMES = ("eager", "torchscript", "onnx-fp32", "onnx-int8")
AXES = {"time": 1, "src_len": 32, "past_len": 16, "present_len": 17}
Runner = Callable[[dict[str, np.ndarray]], Any]


def feeds(graph: GraphSpec, batch: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``graph`` at ``batch`` rows: ids in [4, vocab), masks all False, floats ~ N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in graph.inputs:
        # "sources": seq2seq decode_step's cross K/V, one per source; one source per row here (no beams)
        shape = tuple(d if isinstance(d, int) else batch if d in ("batch", "sources") else AXES[d]
                      for d in spec.shape)
        if spec.dtype == "int64":
            out[spec.name] = rng.integers(4, max(vocab, 5), shape, dtype=np.int64)
            if spec.name == "positions":
                out[spec.name] = np.full(shape, AXES["past_len"], dtype=np.int64)
        elif spec.dtype == "bool":
            out[spec.name] = np.zeros(shape, dtype=bool)
        else:
            out[spec.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def time_runner(run: Runner, inputs: dict[str, np.ndarray], budget_s: float, min_iters: int = 3,
                max_iters: int = 2000) -> tuple[float, int]:
    """Median seconds per call (after one warm-up call) and the number of timed calls."""
    run(inputs)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def open_runners(repository: Path, checkpoints: Path, name: str, device: str) -> dict[str, dict[str, Runner | str]]:
    """runtime -> graph -> runner (or the reason it is unavailable, as a string)."""
    import torch

    from deepserve.export.formats import module_runner
    from deepserve.export.graphs import build_graphs
    from deepserve.serve.backends import BackendUnavailable
    from deepserve.serve.runtime import open_runtime
    from deepserve.train.checkpoint import load_checkpoint, restore_model

    m = manifest(repository, name)
    directory = repository / name / "1"
    payload = load_checkpoint(checkpoints / f"{name}.pt")
    model = restore_model(payload).to(device)
    graphs = build_graphs(payload["task"], payload["model"]["type"], model.cpu(), payload["data"], name).graphs
    out: dict[str, dict[str, Runner | str]] = {r: {} for r in RUNTIMES}
    for graph_name, spec in m.graphs.items():
        wrapper = graphs[graph_name].module.eval().to(device)
        eager = module_runner(wrapper, graphs[graph_name].input_names, graphs[graph_name].output_names)
        if device == "cuda":
            out["eager"][graph_name] = _cuda_eager(wrapper, graphs[graph_name].input_names)
        else:
            out["eager"][graph_name] = eager
        for runtime, (backend, precision) in {"torchscript": ("torchscript", "fp32"), "onnx-fp32": ("onnx", "fp32"),
                                               "onnx-int8": ("onnx", "int8")}.items():
            if precision == "int8" and "onnx-int8" not in spec.files:
                out[runtime][graph_name] = "no int8 graph in the artifact"
                continue
            try:
                rt = open_runtime(spec, directory, backend=backend, device=device, precision=precision)  # type: ignore[arg-type]
            except BackendUnavailable as e:
                out[runtime][graph_name] = str(e)
                continue
            out[runtime][graph_name] = rt.run
    torch.set_num_threads(torch.get_num_threads())
    return out


def _cuda_eager(module: Any, names: list[str]) -> Runner:
    import torch

    def run(inputs: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(inputs[n]).cuda() for n in names])
            out = out if isinstance(out, (tuple, list)) else (out,)
            return [o.cpu() for o in out]

    return run


def run_scenario(report: Report, repository: Path, checkpoints: Path, p: Plan, names: list[str]) -> dict[str, Any]:
    """Measure every (model, graph, runtime, batch); returns ``{model: {graph: {runtime: {batch: ms}}}}``."""
    section = report.section("Scenario 4 — model level: eager vs TorchScript vs ONNX Runtime")
    section.blocks.append(
        f"In process, {p.device}, median of repeated calls ({p.model_time_s:g} s per measurement); "
        "latency per call in milliseconds (rows/s in brackets). " + __doc__.split("\n\n")[1].replace("\n", " "))
    data: dict[str, Any] = {}
    for name in names:
        vocab = int(manifest(repository, name).model.get("vocab_size", 16))
        runners = open_runners(repository, checkpoints, name, p.device)
        data[name] = {}
        for graph_name, spec in manifest(repository, name).graphs.items():
            table = Table(["runtime", *[f"batch {b}" for b in p.batches]], title=f"{name} — graph `{graph_name}`")
            data[name][graph_name] = {}
            for runtime in RUNTIMES:
                runner = runners[runtime].get(graph_name)
                cells: list[Any] = []
                data[name][graph_name][runtime] = {}
                for batch in p.batches:
                    if isinstance(runner, str) or runner is None:
                        cells.append(f"n/a ({runner})" if batch == p.batches[0] else "n/a")
                        continue
                    seconds, _ = time_runner(runner, feeds(spec, batch, vocab), p.model_time_s)
                    data[name][graph_name][runtime][batch] = seconds * 1000
                    cells.append(f"{seconds * 1000:.3g} ({batch / seconds:,.0f}/s)")
                table.add(runtime, *cells)
            section.blocks.append(table)
    bars = {f"{r}": ([f"{n}/{g}" for n in data for g in data[n]],
                     [data[n][g][r].get(1) for n in data for g in data[n]]) for r in RUNTIMES}
    section.blocks.append(Plot("model-level-b1", "Model level: batch-1 latency (ms, log scale)", bars, "model / graph",
                               "ms per call", kind="bar", logy=True))
    report.data["model_level_ms"] = data
    for name in ("digits-cnn", "resnet18"):
        if name not in data:
            continue
        eager, onnx = data[name]["model"]["eager"].get(1), data[name]["model"]["onnx-fp32"].get(1)
        ratio = onnx / eager if eager and onnx else None
        report.target(f"{name}: ONNX Runtime batch-1 latency / eager", "<= 0.70", ratio,
                      None if ratio is None else ratio <= 0.70,
                      f"ORT {onnx:.3g} ms vs eager {eager:.3g} ms" if ratio is not None else "not measured")
    return data


def classifier_runner(repository: Path, name: str, backend: str, device: str) -> tuple[Runner, Callable[[int], dict]]:
    """``name``'s classifier graph opened with ``backend`` as the server opens it (the ceiling that server
    throughput and latency are compared with), and a function giving its inputs for a batch size."""
    from deepserve.serve.runtime import open_runtime

    m = manifest(repository, name)
    spec = m.graphs["model"]
    rt = open_runtime(spec, repository / name / "1", backend=backend, device=device)  # type: ignore[arg-type]
    return rt.run, lambda batch: feeds(spec, batch, 16)
