"""Scenario 8: scale-out. The plain server (``deepserve serve``) against the Ray Serve application
(``deepserve serve --engine ray``) with 1 and 2 replicas per model, on the digits CNN and ResNet-18.

One plain server and one Ray application run side by side for the whole scenario; the Ray repository holds each
model twice, as ``<model>-r1`` (1 replica) and ``<model>-r2`` (2 replicas). Cells (KServe v2 binary, one row
per request) are measured in rounds, the three servers back to back in alternating order (``paired``), and each
ratio is the median over rounds of same-round ratios: on a shared VM the speed drifts more between minutes than
the differences measured here. The load generator runs on the same cores, so on 2 cores two replicas cannot
double throughput: the question is what the Ray hop (proxy -> ingress -> replica) costs, and whether a second
replica's batcher pays for itself. Each cell also reads the CPU time of the serving processes (``/proc``) per
request; a last table compares that cost under Ray Serve's default settings and its throughput-optimised mode,
which ``deepserve serve --engine ray`` sets for the local Ray it starts.

    python -m benchmarks.run --only scaleout
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
from typing import Any, Callable

from benchmarks.classification import payloads
from benchmarks.common import Cell, Plan, measure, paired_ratio, proc_cpu_s
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

    def __init__(self, repository: Path, device: str, startup_timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.repository, self.device, self.startup_timeout_s = repository, device, startup_timeout_s
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> RayServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deepserve.cli", "serve", "--engine", "ray", "--repository", str(self.repository),
             "--port", str(self.port), "--device", self.device, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline, seen = time.monotonic() + self.startup_timeout_s, b""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:  # the serving line, read from the pipe as it comes (no reader buffer to hide a line in)
            remaining = deadline - time.monotonic()
            readable = select.select([fd], [], [], max(0.0, remaining))[0]
            chunk = os.read(fd, 65536) if readable else b""
            seen += chunk
            if re.search(rb"Ray Serve application .* serving", seen):
                return self
            if remaining <= 0 or (not chunk and self.process.poll() is not None):
                self.__exit__()
                raise ServerError("Ray Serve app did not start:\n" + seen.decode(errors="replace")[-3000:])

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


def ray_processes() -> dict[str, list[int]]:
    """Ray Serve's processes by role, from their titles: ``proxy`` (``ray::ProxyActor``) and each application's
    replicas (``ray::ServeReplica:<app>:<deployment>``: ``deepserve`` is the ingress, ``deepserve.<model>`` a
    model's)."""
    roles: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        replica = re.search(r"ServeReplica:([^: ]+):", title)
        role = "proxy" if "ProxyActor" in title else replica.group(1) if replica else None
        if role is not None:
            roles.setdefault(role, []).append(int(entry.name))
    return roles


def _with_cpu(pids: dict[str, list[int]], run: Callable[[], Cell], concurrency: int) -> dict[str, Any]:
    """``run()``'s row, with ``cpu_ms``: each role's CPU milliseconds per request answered (warm-up requests
    included: ``measure`` sends ``2 * concurrency`` before it times)."""
    before = {role: sum(proc_cpu_s(p) for p in ps) for role, ps in pids.items()}
    row = run().row()
    requests = max(1, row["ok"] + 2 * concurrency)
    row["cpu_ms"] = {role: 1000.0 * (sum(proc_cpu_s(p) for p in ps) - before[role]) / requests
                     for role, ps in pids.items()}
    return row


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
                    cells: dict[str, dict[str, Any]] = {}
                    roles = ray_processes()
                    for variant in order:
                        port, pid, route = ((plain.port, plain.pid, name) if variant == "plain"
                                            else (ray.port, None, f"{name}-{variant[4:]}"))
                        pids = ({"server": [plain.pid]} if variant == "plain" else
                                {"proxy": roles.get("proxy", []), "ingress": roles.get("deepserve", []),
                                 "replicas": roles.get(f"deepserve.{route}", [])})
                        requests = payloads(name, route)["binary"]
                        cells[variant] = _with_cpu(pids, lambda: measure(port, requests, c, p, server_pid=pid), c)
                    rounds.setdefault((name, c), []).append(cells)
                    print(f"[bench] scaleout {name} c={c} round {i + 1}: " + ", ".join(
                        f"{v} {cells[v]['rps']:.0f} req/s" for v in VARIANTS), flush=True)
    _write(report, rounds, p)
    report.data["scaleout"] = {f"{n} / c={c}": r for (n, c), r in rounds.items()}
    report.data["scaleout_ray_modes"] = _ray_modes(report, source, p, names[0])
    return rounds


RAY_MODES = {"Ray Serve's defaults": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
             "throughput-optimised (what deepserve's local Ray runs)": {}}
MODE_CONCURRENCY = 32


def _ray_modes(report: Report, source: Path, p: Plan, name: str) -> list[dict[str, Any]]:
    """The Ray path's CPU per request under Ray Serve's default settings and under its throughput-optimised
    mode, on ``name`` with 1 replica: a fresh local Ray per cell (the mode is read when Serve's processes
    start), two rounds in alternating order."""
    repo = serving_repository(source, {f"{name}-r1": (name, {"ray": {"num_replicas": 1, "num_cpus": REPLICA_CPUS}})})
    requests = payloads(name, f"{name}-r1")["binary"]
    rounds = []
    for i in range(2):
        cells = {}
        for mode in (list(RAY_MODES) if i % 2 == 0 else list(reversed(RAY_MODES))):
            with RayServer(repo, p.device, env=RAY_MODES[mode]) as ray:
                roles = ray_processes()
                pids = {"proxy": roles.get("proxy", []), "ingress": roles.get("deepserve", []),
                        "replicas": roles.get(f"deepserve.{name}-r1", [])}
                cells[mode] = _with_cpu(pids, lambda: measure(ray.port, requests, MODE_CONCURRENCY, p),
                                        MODE_CONCURRENCY)
            print(f"[bench] scaleout Ray mode {mode!r} round {i + 1}: {cells[mode]['rps']:.0f} req/s, "
                  f"{sum(cells[mode]['cpu_ms'].values()):.1f} CPU ms/request", flush=True)
        rounds.append(cells)
    table = Table(["Ray Serve mode", "req/s", "CPU ms/request (proxy + ingress + replica)", "CPU vs defaults"],
                  title=f"The Ray path's cost: {name}, 1 replica, concurrency {MODE_CONCURRENCY}")
    defaults = list(RAY_MODES)[0]
    for mode in RAY_MODES:
        ratio = paired_ratio([(sum(r[mode]["cpu_ms"].values()), sum(r[defaults]["cpu_ms"].values()))
                              for r in rounds])
        table.add(mode, _median([r[mode]["rps"] for r in rounds]), _cpu_text([r[mode]["cpu_ms"] for r in rounds]),
                  None if mode == defaults else ratio)
    section = report.section("Scenario 8 — the Ray path's CPU per request, by Ray Serve mode")
    section.blocks.append(f"Each cell starts its own local Ray (Serve reads the mode when its processes start), "
                          f"{p.cell_s} s of v2 binary requests; two rounds in alternating order, medians.")
    section.blocks.append(table)
    return rounds


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _cpu_text(cells: list[dict[str, float]]) -> str:
    """Median CPU milliseconds per request over rounds: the total, and for Ray each process's share."""
    roles = list(cells[0])
    median = {role: _median([c[role] for c in cells]) or 0.0 for role in roles}
    total = _median([sum(c.values()) for c in cells]) or 0.0
    if roles == ["server"]:
        return f"{total:.2f}"
    return f"{total:.1f} ({' + '.join(f'{median[r]:.1f}' for r in roles)})"


def _write(report: Report, rounds: dict[tuple[str, int], list[dict[str, dict[str, Any]]]], p: Plan) -> None:
    section = report.section("Scenario 8 — scale-out: plain server vs Ray Serve with 1 and 2 replicas")
    section.blocks.append(
        f"KServe v2 binary requests, one row each; {p.paired_rounds} rounds, the three servers measured back to "
        f"back in alternating order within each round ({p.cell_s} s cells). req/s and p99 are medians over "
        "rounds; the ratios are medians of same-round ratios. Ray replicas reserve "
        f"{REPLICA_CPUS} CPU each on a local 2-CPU Ray; the load generator shares the same 2 cores. Errors "
        "count non-200 answers. CPU ms/request: CPU time of the serving processes (user + system, from /proc) "
        "over the requests of the cell, warm-up included; for Ray, Serve's HTTP proxy, the ingress and the "
        "model's replicas.")
    table = Table(["model", "concurrency", "server", "req/s", "p50 ms", "p99 ms", "errors",
                   "req/s vs plain (paired)", "CPU ms/request (proxy + ingress + replicas)"],
                  title="Plain deepserve vs Ray Serve")
    for (name, c), cells in rounds.items():
        for variant in VARIANTS:
            rows = [r[variant] for r in cells]
            ratio = None if variant == "plain" else paired_ratio([(r[variant]["rps"], r["plain"]["rps"])
                                                                  for r in cells])
            table.add(name, c, variant, _median([r["rps"] for r in rows]), _median([r["p50_ms"] for r in rows]),
                      _median([r["p99_ms"] for r in rows]), sum(sum(r["errors"].values()) for r in rows), ratio,
                      _cpu_text([r["cpu_ms"] for r in rows]))
    section.blocks.append(table)
    section.blocks.append("Per round (req/s, plain / ray-r1 / ray-r2): " + "; ".join(
        f"{n} c={c}: " + ", ".join("/".join(f"{r[v]['rps']:.0f}" for v in VARIANTS) for r in cells)
        for (n, c), cells in rounds.items()))
