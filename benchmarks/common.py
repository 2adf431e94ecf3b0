"""What the scenarios share: the run plan (durations and matrices, full or quick), timing one load cell with
the CPU each side used, paired measurements for the ratios that targets are judged on, and profiling a server
with py-spy when a target is missed."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadResult, LoadSpec, Request, TokenCounter, run_load


@dataclass(frozen=True)
class Plan:
    """How long and how wide a run is. ``full`` fits ``make bench`` in ~13 minutes on 2 cores."""

    name: str
    """``full`` or ``quick``."""
    cell_s: float
    """Measured seconds per HTTP cell."""
    max_requests: int
    """Cap on measured requests per cell."""
    concurrency: tuple[int, ...]
    """Classification concurrencies."""
    gen_concurrency: tuple[int, ...]
    """Generation concurrencies."""
    gen_tokens: int
    """Tokens generated per request (forced with min_new_tokens)."""
    batches: tuple[int, ...]
    """Model-level batch sizes."""
    model_time_s: float
    """Time budget per model-level measurement."""
    device: str = "cpu"
    """cpu or cuda."""
    paired_rounds: int = 3
    """Rounds of alternating measurements behind each ratio a target is judged on (see ``paired``)."""

    def settings(self) -> dict[str, Any]:
        return {"plan": self.name, "cell_s": self.cell_s, "device": self.device}


def plan(quick: bool, device: str = "cpu") -> Plan:
    if quick:
        return Plan("quick", 0.6, 5000, (1, 64), (1, 32), 16, (1, 8, 64), 0.25, device, paired_rounds=1)
    return Plan("full", 2.5, 50000, (1, 16, 64), (1, 8, 32), 32, (1, 8, 64), 1.0, device)


def backends(device: str) -> tuple[str, ...]:
    """Backends usable on ``device``: TorchScript always; ONNX Runtime when installed (with its CUDA provider
    on cuda) and when ``onnx`` is there to export the graphs."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return ("torchscript",)
    if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return ("torchscript",)
    return ("onnx", "torchscript")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc); 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Cell:
    """One measured cell: the load result plus the CPU share each side took (100% = one core)."""

    result: LoadResult
    server_cpu_pct: float
    generator_cpu_pct: float

    def row(self) -> dict[str, Any]:
        out = self.result.summary()
        out["server_cpu_pct"] = self.server_cpu_pct
        out["generator_cpu_pct"] = self.generator_cpu_pct
        return out


def measure(port: int, requests: list[Request], concurrency: int, p: Plan, *, server_pid: int | None = None,
            stream: bool = False, count_tokens: TokenCounter | None = None, duration_s: float | None = None,
            warmup: int | None = None) -> Cell:
    spec = LoadSpec("127.0.0.1", port, tuple(requests), concurrency, duration_s or p.cell_s, p.max_requests,
                    warmup_requests=concurrency * 2 if warmup is None else warmup, stream=stream,
                    drain_s=max(5.0, 4 * p.cell_s))
    server0 = proc_cpu_s(server_pid) if server_pid else 0.0
    self0, wall0 = _self_cpu_s(), time.perf_counter()
    result = asyncio.run(run_load(spec, count_tokens))
    wall = max(time.perf_counter() - wall0, 1e-9)
    server = (proc_cpu_s(server_pid) - server0) if server_pid else 0.0
    return Cell(result, 100.0 * server / wall, 100.0 * (_self_cpu_s() - self0) / wall)


def paired(first: Callable[[], float], second: Callable[[], float], rounds: int) -> list[tuple[float, float]]:
    """``(first(), second())`` for each of ``rounds`` rounds, alternating which goes first (ABBA order).

    A ratio of two numbers measured minutes apart on a shared VM is mostly the VM's drift: the same
    in-process ResNet-18 batch has read 81-122 rows/s within ten seconds. Measured back to back, in
    alternating order, both sides of a ratio see the same machine."""
    out = []
    for i in range(rounds):
        if i % 2 == 0:
            a = first()
            out.append((a, second()))
        else:
            b = second()
            out.append((first(), b))
    return out


def paired_ratio(pairs: list[tuple[float, float]]) -> float | None:
    """Median over rounds of ``first / second``; None when a round has no ``second``."""
    ratios = sorted(a / b for a, b in pairs if b)
    if not ratios or len(ratios) < len(pairs):
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def profile_server(pid: int, seconds: float, load: Callable[[], Any], top: int = 8) -> str:
    """Sample ``pid`` with py-spy while ``load()`` runs; the functions holding most samples, as one line.

    Returns a sentence saying why there is no profile when py-spy is missing or not permitted."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(os.sys.executable).parent))
    if not py_spy:
        return "no profile: py-spy is not installed (pip install py-spy)"
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        out = Path(tmp) / "stacks.txt"
        proc = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                                 "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load()
        try:
            _, err = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return "no profile: py-spy did not finish"
        if not out.is_file():
            return f"no profile: py-spy failed ({(err or '').strip()[-200:]})"
        return summarize_stacks(out.read_text(), top)


def summarize_stacks(raw: str, top: int = 8) -> str:
    """py-spy ``raw`` (collapsed) stacks -> ``"35% run (onnxruntime/...session.py); 12% ..."`` by leaf function."""
    leaves: Counter = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        name, _, where = leaf.partition(" (")
        where = where.rstrip(")").rsplit(":", 1)[0]
        where = "/".join(Path(where).parts[-2:]) if where else ""
        leaves[f"{name} ({where})" if where else name] += int(count)
        total += int(count)
    if not total:
        return "profile: no samples (the server was idle)"
    return "profile (py-spy, server, by leaf function): " + "; ".join(
        f"{100 * n / total:.0f}% {name}" for name, n in leaves.most_common(top))
