"""Scenario 8: scale-out. The plain server (``deepserve serve``) against the Ray Serve application
(``deepserve serve --engine ray``) with 1 and 2 replicas per model, on the digits CNN and ResNet-18.

One plain server and one Ray application run side by side for the whole scenario; the Ray repository holds each
model twice, as ``<model>-r1`` (1 replica) and ``<model>-r2`` (2 replicas). Cells (KServe v2 binary, one row
per request) are measured in rounds, the three servers back to back in alternating order (``paired``), and each
ratio is the median over rounds of same-round ratios: on a shared VM the speed drifts more between minutes than
the differences measured here. The load generator runs on the same cores, so on 2 cores two replicas cannot
double throughput: the question is what the Ray hop (proxy -> ingress -> replica) costs, and whether a second
replica's batcher pays for itself.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.classification import payloads
from benchmarks.common import Plan, measure, paired_ratio
from benchmarks.models import serving_repository
from benchmarks.results import Report, Table
from benchmarks.servers import ROOT, ServerError, ServerProcess

VARIANTS = ("plain", "ray-r1", "ray-r2")
CONCURRENCY = (1, 32)
REPLICA_CPUS = 0.25
"""Ray's CPU reservation per replica: six replicas and the ingress fit a 2-CPU node."""


class RayServer:
    """``deepserve serve --engine ray`` on a free loopback port; ready when it prints its serving line and
    ``/v2/health/ready`` answers. SIGTERM stops it (Serve drains, Ray shuts down)."""

    def __init__(self, repository: Path, device: str, startup_timeout_s: float = 300.0) -> None:
        self.repository, self.device, self.startup_timeout_s = repository, device, startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> RayServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deepserve.cli", "serve", "--engine", "ray", "--repository", str(self.repository),
             "--port", str(self.port), "--device", self.device, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        deadline, seen = time.monotonic() + self.startup_timeout_s, []
        assert self.process.stdout is not None
        while True:  # the serving line, read as it comes (select with the remaining time)
            remaining = deadline - time.monotonic()
            readable = select.select([self.process.stdout], [], [], max(0.0, remaining))[0]
            line = self.process.stdout.readline() if readable else ""
            seen.append(line)
            if re.search(r"Ray Serve application .* serving", line):
                return self
            if remaining <= 0 or (not line and self.process.poll() is not None):
                self.__exit__()
                raise ServerError("Ray Serve app did not start:\n" + "".join(seen)[-3000:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_scenario(report: Report, source: Path, p: Plan, names: list[str]) -> dict[str, Any]:
    plain_repo = serving_repository(source, {n: (n, {}) for n in names})
    ray_repo = serving_repository(source, {f"{n}-r{k}": (n, {"ray": {"num_replicas": k, "num_cpus": REPLICA_CPUS}})
                                           for n in names for k in (1, 2)})
    report.settings["commit"] = _commit()
    rounds: dict[tuple[str, int], list[dict[str, dict[str, Any]]]] = {}
    with ServerProcess("deepserve", repository=plain_repo, device=p.device) as plain, \
            RayServer(ray_repo, p.device) as ray:
        for i in range(p.paired_rounds):
            order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
            for name in names:
                for c in CONCURRENCY:
                    cells = {}
                    for variant in order:
                        port, pid, route = ((plain.port, plain.pid, name) if variant == "plain"
                                            else (ray.port, None, f"{name}-{variant[4:]}"))
                        requests = payloads(name, route)["binary"]
                        cells[variant] = measure(port, requests, c, p, server_pid=pid).row()
                    rounds.setdefault((name, c), []).append(cells)
                    print(f"[bench] scaleout {name} c={c} round {i + 1}: " + ", ".join(
                        f"{v} {cells[v]['rps']:.0f} req/s" for v in VARIANTS), flush=True)
    _write(report, rounds, p)
    report.data["scaleout"] = {f"{n} / c={c}": r for (n, c), r in rounds.items()}
    return rounds


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _write(report: Report, rounds: dict[tuple[str, int], list[dict[str, dict[str, Any]]]], p: Plan) -> None:
    section = report.section("Scenario 8 — scale-out: plain server vs Ray Serve with 1 and 2 replicas")
    section.blocks.append(
        f"KServe v2 binary requests, one row each; {p.paired_rounds} rounds, the three servers measured back to "
        f"back in alternating order within each round ({p.cell_s} s cells). req/s and p99 are medians over "
        "rounds; the ratios are medians of same-round ratios. Ray replicas reserve "
        f"{REPLICA_CPUS} CPU each on a local 2-CPU Ray; the load generator shares the same 2 cores. Errors "
        "count non-200 answers.")
    table = Table(["model", "concurrency", "server", "req/s", "p50 ms", "p99 ms", "errors",
                   "req/s vs plain (paired)"], title="Plain deepserve vs Ray Serve")
    for (name, c), cells in rounds.items():
        for variant in VARIANTS:
            rows = [r[variant] for r in cells]
            ratio = None if variant == "plain" else paired_ratio([(r[variant]["rps"], r["plain"]["rps"])
                                                                  for r in cells])
            table.add(name, c, variant, _median([r["rps"] for r in rows]), _median([r["p50_ms"] for r in rows]),
                      _median([r["p99_ms"] for r in rows]), sum(sum(r["errors"].values()) for r in rows), ratio)
    section.blocks.append(table)
    section.blocks.append("Per round (req/s, plain / ray-r1 / ray-r2): " + "; ".join(
        f"{n} c={c}: " + ", ".join("/".join(f"{r[v]['rps']:.0f}" for v in VARIANTS) for r in cells)
        for (n, c), cells in rounds.items()))
