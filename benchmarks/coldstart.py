"""Scenario 7: cold start — `deepserve serve` from process start to ready, the first request, and memory.

The real command (`python -m deepserve.cli serve`, `--device auto`) on repositories of 1 (the digits CNN), 3 (the
default repository's models: digits CNN, char-LM, seq2seq) and 20 small models (clones of the digits CNN).
Ready is the moment uvicorn listens, after the lifespan (every model loaded, verified and warmed up), read from
its log as it comes. Then each model gets its first request (a v2 JSON image, or 8 generated tokens), timed,
and a second one; RSS is read from `/proc` after them, and `torch` says whether libtorch is mapped into the
process. The 3-model row is repeated with `import torch` before deepserve (what every replica paid before
serving stopped importing it). The configurations run in rotating order, round after round, since start-up
times on a shared machine drift.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Plan
from benchmarks.models import serving_repository
from benchmarks.results import Report, Table
from benchmarks.servers import ROOT

READY_LINE = "Uvicorn running on"
"""uvicorn logs it once the lifespan is done (every model ready) and the socket listens."""
TORCH_FIRST = "import sys, torch; from deepserve.cli import main; sys.exit(main(sys.argv[1:]))"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict[str, Any]) -> float:
    """Seconds for one JSON POST (raises on a non-2xx answer)."""
    data = json.dumps(payload).encode()
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}),
                                timeout=120) as r:
        r.read()
    return time.perf_counter() - start


def first_request(base: str, model: str, task: str) -> float:
    if task == "image-classification":
        x = np.zeros((1, 1, 8, 8), np.float32)
        return _post(f"{base}/v2/models/{model}/infer", {"inputs": [
            {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
    return _post(f"{base}/v2/models/{model}/generate", {"text_input": "The ", "parameters": {"max_new_tokens": 8}})


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def serve_once(repository: Path, tasks: dict[str, str], torch_first: bool = False) -> dict[str, Any]:
    """One start of `deepserve serve`: seconds to ready, first and second request per model, RSS, torch."""
    port = _free_port()
    code = ["-c", TORCH_FIRST] if torch_first else ["-m", "deepserve.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *code, "serve", "--repository", str(repository), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stderr is not None
    ready_s, log = None, []
    for line in proc.stderr:  # blocking reads of the log as it comes: no polling
        log.append(line)
        if READY_LINE in line:
            ready_s = time.perf_counter() - start
            break
    if ready_s is None:
        raise RuntimeError(f"deepserve serve exited with {proc.wait()} before ready:\n{''.join(log[-20:])}")
    drain = threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True)  # keep the pipe flowing
    drain.start()
    try:
        base = f"http://127.0.0.1:{port}"
        first = {m: first_request(base, m, t) for m, t in tasks.items()}
        second = {m: first_request(base, m, t) for m, t in tasks.items()}
        return {"ready_s": ready_s, "first_ms": {m: 1000 * s for m, s in first.items()},
                "second_ms": {m: 1000 * s for m, s in second.items()}, "rss_mb": _rss_mb(proc.pid),
                "torch": _torch_mapped(proc.pid)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(5)


def configurations(source: Path) -> dict[str, tuple[Path, dict[str, str], bool]]:
    """label -> (repository, model -> task, import torch first)."""
    defaults = {"digits-cnn": "image-classification", "charlm": "char-lm", "seq2seq": "seq2seq"}
    twenty = {f"digits-cnn-{i:02d}": "image-classification" for i in range(20)}
    one = serving_repository(source, {"digits-cnn": ("digits-cnn", {})})
    three = serving_repository(source, {m: (m, {}) for m in defaults})
    many = serving_repository(source, {m: ("digits-cnn", {}) for m in twenty})
    return {"1 model": (one, {"digits-cnn": "image-classification"}, False), "3 models (defaults)": (three, defaults, False),
            "20 models": (many, twenty, False), "3 models, torch imported first": (three, defaults, True)}


def run_scenario(report: Report, source: Path, p: Plan) -> dict[str, Any]:
    section = report.section("Scenario 7 — cold start and memory")
    section.blocks.append(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    configs = configurations(source)
    rounds = 2 if p.name == "quick" else 5
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
    labels = list(configs)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            runs[label].append(serve_once(*configs[label]))
            print(f"[coldstart] {label} round {r}: {runs[label][-1]}", flush=True)
    table = Table(["repository", "start to ready s (median; all rounds)", "first request ms (median over models; "
                   "max)", "second request ms (median)", "RSS MB (median)", "torch loaded"],
                  title=f"`deepserve serve`, {rounds} rounds in rotating order")
    summary = {}
    for label, rs in runs.items():
        ready = [r["ready_s"] for r in rs]
        firsts = [v for r in rs for v in r["first_ms"].values()]
        seconds = [v for r in rs for v in r["second_ms"].values()]
        rss = float(np.median([r["rss_mb"] for r in rs]))
        summary[label] = {"ready_s": float(np.median(ready)), "first_ms": float(np.median(firsts)), "rss_mb": rss}
        table.add(label, f"{np.median(ready):.2f}; " + ", ".join(f"{v:.2f}" for v in ready),
                  f"{np.median(firsts):.1f}; {max(firsts):.1f}", float(np.median(seconds)), rss,
                  "yes" if any(r["torch"] for r in rs) else "no")
    section.blocks.append(table)
    report.data["coldstart"] = {"runs": runs, "summary": summary}
    three = summary["3 models (defaults)"]
    report.target("ONNX-only server RSS, the three default models (after their first requests)", "<= 150 MB",
                  three["rss_mb"], three["rss_mb"] <= 150, f"median of {rounds} starts; with torch imported first: "
                  f"{summary['3 models, torch imported first']['rss_mb']:.0f} MB")
    report.target("process start to ready, the default repository's three models", "<= 1.5 s", three["ready_s"],
                  three["ready_s"] <= 1.5, f"median of {rounds} starts; 1 model {summary['1 model']['ready_s']:.2f} s, "
                  f"20 models {summary['20 models']['ready_s']:.2f} s, torch imported first "
                  f"{summary['3 models, torch imported first']['ready_s']:.2f} s")
    return summary
