"""Scenario 6: tail latency under load — the collector's pauses, the first burst after a start, and mosec.

Classification at concurrency 64 for each model and protocol: a fresh deepserve server (default settings) and,
for JSON and the raw image, a fresh mosec peer (``benchmarks.mosec_peer``: same model file, same bodies, same
load generator). On the digits CNN also deepserve on the plain asyncio event loop (``deepserve asyncio``) and,
over JSON, ``deepserve serve --workers 2`` (two server processes on the port) and the HTTP stack under it without
deepserve: a bare ASGI app on uvicorn (httptools, uvloop, no framework) and a bare FastAPI route, both reading the
body and answering a fixed small JSON body (``benchmarks.echo``). Repetition 0 is the first burst right after
ready, with no warm-up requests; then repetitions run the servers in alternating order (ABBA), so each
repetition's servers saw the same shared machine. The generator opens its 64 connections at once before each
repetition's clock starts, then sends 64 requests at once: only the client's TCP handshakes are off the clock
(the time until all 64 connects returned on its loop is shown apart); the server's accept and protocol set-up of
the 64 connections still fall in the first wave. Every
repetition is shown with its p50, p99 and max, so that a stall cannot hide in a median, and with how long the
server's main threads (its event loops) and the load generator's were runnable but waited for a core (Linux
``schedstat``): on a shared machine that is where a stall comes from when nothing in the server was slow. The
server's CPU per request counts every thread of its processes (for mosec, its front end and its worker).

The collector options are compared the same way on the digits CNN over JSON, one server per option, in
rotating order: deepserve as shipped (start-up heap frozen), as before (not frozen), larger thresholds, and the
collector disabled (the reference, which a long-running server cannot ship). ``gen2`` counts the full
collections during the repetition (``python_gc_collections_total``). Generation: the char-LM streaming greedy
tokens at concurrency 32 from deepserve as shipped, not frozen, and on the asyncio loop; the inter-token latency
is the gap between consecutive token events of a stream, as the load generator reads them, and beside it the
server's own: the time between two of its steps (``deepserve_generation_step_interval_seconds``, quantiles
interpolated in buckets 25% apart), the tail the server controls apart from the shared machine's.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.classification import payloads
from benchmarks.common import Plan
from benchmarks.generation import prompts, requests_for
from benchmarks.loadgen import LoadResult, LoadSpec, Request, Response, run_load
from benchmarks.models import MODELS
from benchmarks.results import Report, Table
from benchmarks.servers import MosecProcess, ServerProcess

CONCURRENCY, GEN_CONCURRENCY = 64, 32
REQUESTS = {"digits-cnn": 3000, "resnet18": 320}
"""Requests per classification repetition: the issue's 3,000 for the digits CNN; ResNet-18 serves ~100 rows/s on 2
cores, so 5 per client."""
PROTOCOLS = ("json", "binary", "image")
MOSEC_PROTOCOLS = ("json", "image")
READ_GAP_S = 1e-4
"""Token events less than this apart arrived in one read of the load generator."""
LAG_PROBE_S = 1e-3
"""Period of the timer that measures the load generator's own event-loop lag during a generation cell."""
VARIANTS = {"deepserve asyncio": ("--loop", "asyncio")}
"""Servers beside deepserve as shipped (uvloop) on the digits CNN: the plain asyncio event loop."""
WORKERS_SIDE, WORKERS = "deepserve --workers 2", 2
"""On the digits CNN over JSON also ``deepserve serve --workers 2``: two server processes on the port."""
BARE_SIDE, ECHO_SIDE = "bare ASGI on uvicorn", "bare FastAPI route"
"""On the digits CNN over JSON also the HTTP stack alone: what uvicorn, then FastAPI on it, serve with no model."""
GC_OPTIONS = {"shipped": (), "nofreeze": ("--gc", "nofreeze"),
              "thresholds 10000,50,100": ("--gc", "thresholds", "--gc-thresholds", "10000,50,100"),
              "disabled": ("--gc", "disabled")}
GEN_OPTIONS = {"shipped": (), "nofreeze": GC_OPTIONS["nofreeze"], "asyncio": ("--loop", "asyncio")}
"""The char-LM stream's servers: as shipped, its heap not frozen, and on the plain asyncio event loop."""


def repetitions(p: Plan) -> int:
    return 2 if p.name == "quick" else 4


def run_cell(port: int, requests: list[Request], concurrency: int, count: int, *, stream: bool = False,
             on_response: Callable[[Response], int] | None = None, lags: list[float] | None = None) -> LoadResult:
    """``count`` requests at ``concurrency``, no warm-up (a fresh server's first call is its first burst); with
    ``lags``, the load generator's own loop lag goes there."""
    spec = LoadSpec("127.0.0.1", port, tuple(requests), concurrency, 600.0, count, drain_s=30.0, stream=stream)
    load = run_load(spec, on_response)
    return asyncio.run(load if lags is None else _lag_probed(load, lags))


async def _lag_probed(run: Awaitable[LoadResult], lags: list[float]) -> LoadResult:
    """``run``, while a ``LAG_PROBE_S`` timer records how late the generator's loop wakes it: the generator shares
    the cores, and a read it makes late is a gap of its own, not of the server."""

    async def probe() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            lags.append(time.perf_counter() - t - LAG_PROBE_S)

    task = asyncio.ensure_future(probe())
    try:
        return await run
    finally:
        task.cancel()


def stats_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(seconds) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def rep_row(result: LoadResult, **extra: Any) -> dict[str, Any]:
    errors = sum(result.errors.values())
    connect = max(result.connect_s, default=float("nan")) * 1000.0  # all connects returned, before the clock
    return {"rps": result.requests_per_s, **stats_ms(result.latencies_s), "connect_max": connect, "errors": errors,
            **extra}


def gen2_collections(server: ServerProcess) -> float:
    status, text = server.get("/metrics")
    found = re.search(r'python_gc_collections_total\{generation="2"\} ([0-9.e+]+)', text if status == 200 else "")
    return float(found.group(1)) if found else float("nan")


def _schedstat_ms(pid: int, field: int, threads: bool) -> float:
    """Linux ``schedstat`` ``field`` (0: time on a core, 1: time runnable but waiting for one) in milliseconds,
    summed over ``pid`` and its child processes: their main threads, or with ``threads`` all of their threads.
    nan where ``/proc`` does not tell."""
    total, pids = 0, [pid]
    while pids:
        p = pids.pop()
        try:
            tasks = [t.name for t in Path(f"/proc/{p}/task").iterdir()] if threads else [str(p)]
            for t in tasks:
                try:
                    total += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[field])
                except (OSError, ValueError, IndexError):
                    continue  # a thread that ended meanwhile
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            if p == pid:
                return float("nan")
    return total / 1e6


def run_queue_wait_ms(pid: int) -> float:
    """Milliseconds the main threads of ``pid`` and of its child processes have spent runnable but waiting for a
    core: the server's loop preempted by the generator or the machine's other work."""
    return _schedstat_ms(pid, 1, threads=False)


def cpu_ms(pid: int) -> float:
    """Milliseconds of CPU that every thread of ``pid`` and of its child processes has used (threads that ended
    meanwhile are not counted)."""
    return _schedstat_ms(pid, 0, threads=True)


def _mosec_requests(requests: list[Request]) -> list[Request]:
    """The same bodies, to mosec's route."""
    return [Request(r.method, "/inference", r.body, r.headers) for r in requests]


class WorkersServer(ServerProcess):
    """``deepserve serve --workers N`` itself (uvicorn's supervisor and its workers on one port), with the
    benchmark servers' queue setting."""

    def __init__(self, workers: int, **kwargs: Any) -> None:
        super().__init__("deepserve", **kwargs)
        self.workers = workers

    def start(self) -> WorkersServer:
        self.port = self.free_port()
        self.run_until_ready([sys.executable, "-m", "deepserve.cli", "serve", "--repository", str(self.repository),
                              "--port", str(self.port), "--device", self.device or "cpu", "--workers", str(self.workers),
                              "--max-queue-wait-ms", "0", "--log-level", "warning"], self.env, "/v2/health/ready")
        return self


class BareAsgiServer(ServerProcess):
    """``benchmarks.echo:bare_app`` under uvicorn's own command line, with the benchmark servers' uvicorn settings
    (``benchmarks.server_main.uvicorn_config``) and httptools and uvloop named, not left to ``auto``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("bare-asgi", **kwargs)

    def start(self) -> BareAsgiServer:
        self.port = self.free_port()
        self.run_until_ready([sys.executable, "-m", "uvicorn", "benchmarks.echo:bare_app", "--host", self.host,
                              "--port", str(self.port), "--http", "httptools", "--loop", "uvloop", "--lifespan", "off",
                              "--no-access-log", "--log-level", "warning", "--timeout-keep-alive", "120",
                              "--backlog", "2048"], self.env, "/v2/health/ready")
        return self


def _start_sides(sides: dict[str, Any], name: str, protocol: str, source: Path, p: Plan, reqs: list[Request]) -> None:
    """Start the servers of one model and protocol into ``sides``; the peer first: its workers may still be busy starting
    when its front end answers, which must not land in deepserve's first burst."""
    if protocol in MOSEC_PROTOCOLS:
        sides["mosec"] = (MosecProcess(source / name / "1", protocol).start(), _mosec_requests(reqs))
    sides["deepserve"] = (ServerProcess("deepserve", repository=source, device=p.device).start(), reqs)
    if name == "digits-cnn":
        for variant, args in VARIANTS.items():
            sides[variant] = (ServerProcess("deepserve", repository=source, device=p.device, extra_args=args).start(),
                              reqs)
        if protocol == "json":
            sides[WORKERS_SIDE] = (WorkersServer(WORKERS, repository=source, device=p.device).start(), reqs)
            sides[BARE_SIDE] = (BareAsgiServer().start(), reqs)
            sides[ECHO_SIDE] = (ServerProcess("echo").start(), reqs)


def classification(name: str, source: Path, p: Plan, rows: list[dict[str, Any]]) -> None:
    n, reps = REQUESTS[name], repetitions(p)
    for protocol in PROTOCOLS:
        reqs = payloads(name, name)[protocol]
        sides: dict[str, tuple[ServerProcess, list[Request]]] = {}
        try:
            _start_sides(sides, name, protocol, source, p, reqs)
            order = sorted(sides)  # deepserve and its variants, mosec
            for rep in range(reps + 1):
                for server_name in order if rep % 2 == 0 else order[::-1]:
                    server, r = sides[server_name]
                    waited, gen_waited = run_queue_wait_ms(server.pid), run_queue_wait_ms(os.getpid())
                    cpu = cpu_ms(server.pid)
                    res = run_cell(server.port, r, CONCURRENCY, n)
                    rows.append(rep_row(res, model=name, protocol=protocol, server=server_name, rep=rep,
                                        waited=run_queue_wait_ms(server.pid) - waited,
                                        gen_waited=run_queue_wait_ms(os.getpid()) - gen_waited,
                                        cpu_us=(cpu_ms(server.pid) - cpu) * 1000.0 / max(1, res.ok)))
                    print(f"[tail] {name} {protocol} {server_name} rep {rep}: {rows[-1]}", flush=True)
        finally:
            for server, _ in sides.values():
                server.stop()


def gc_options(source: Path, p: Plan, rows: list[dict[str, Any]]) -> None:
    reqs = payloads("digits-cnn", "digits-cnn")["json"]
    servers = {}
    try:
        for option, args in GC_OPTIONS.items():
            servers[option] = ServerProcess("deepserve", repository=source, device=p.device, extra_args=args).start()
        names = list(servers)
        for rep in range(repetitions(p) + 1):
            for option in names[rep % len(names):] + names[:rep % len(names)]:  # rotating order
                before = gen2_collections(servers[option])
                res = run_cell(servers[option].port, reqs, CONCURRENCY, REQUESTS["digits-cnn"])
                rows.append(rep_row(res, option=option, rep=rep, gen2=gen2_collections(servers[option]) - before))
                print(f"[tail] gc {option} rep {rep}: {rows[-1]}", flush=True)
    finally:
        for server in servers.values():
            server.stop()


INTERVAL_METRIC = "deepserve_generation_step_interval_seconds"
"""The server's own inter-token time: from one step with running rows to the next (prefill and joins included)."""


def step_interval_counts(server: ServerProcess) -> dict[float, float]:
    """The server's step-interval histogram, cumulative count per upper bound (empty where the server has none)."""
    status, text = server.get("/metrics")
    families = text_string_to_metric_families(text) if status == 200 else ()
    return {float(b.labels["le"]): b.value for f in families if f.name == INTERVAL_METRIC for b in f.samples
            if b.name == INTERVAL_METRIC + "_bucket"}


def histogram_ms(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """p50 and p99 of what was observed between two reads, in ms, interpolated within a bucket as Prometheus's
    ``histogram_quantile`` does."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    out: dict[str, float | None] = {"p50": None, "p99": None}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        if cum and cum[-1] > 0:
            i = next(k for k, c in enumerate(cum) if c >= q * cum[-1])
            lo, below = (bounds[i - 1], cum[i - 1]) if i else (0.0, 0.0)
            hi = bounds[i] if bounds[i] != float("inf") else lo
            out[name] = 1000.0 * (lo + (hi - lo) * (q * cum[-1] - below) / max(cum[i] - below, 1e-9))
    return out


def generation(source: Path, p: Plan, rows: list[dict[str, Any]]) -> None:
    n = p.gen_tokens
    reqs = requests_for("charlm", prompts("charlm"), "greedy-stream", n)
    servers = {}
    try:
        for option, args in GEN_OPTIONS.items():
            servers[option] = ServerProcess("deepserve", repository=source, device=p.device, extra_args=args).start()
        for rep in range(repetitions(p) + 1):
            for option in servers if rep % 2 == 0 else list(servers)[::-1]:
                gaps: list[float] = []

                def count(response: Response) -> int:
                    times = response.event_times
                    gaps.extend(b - a for a, b in zip(times, times[1:]))
                    return len(times)

                lags: list[float] = []
                before = step_interval_counts(servers[option])
                res = run_cell(servers[option].port, reqs, GEN_CONCURRENCY, 4 * GEN_CONCURRENCY, stream=True,
                               on_response=count, lags=lags)
                server_side = histogram_ms(before, step_interval_counts(servers[option]))
                # a generator on the same 2 cores often reads several events at once (gap 0): "reads" keeps the
                # gaps between separate reads, the pauses a stall would show up in
                itl, reads = stats_ms(gaps), stats_ms([g for g in gaps if g >= READ_GAP_S])
                rows.append({"option": option, "rep": rep, "tokens_per_s": res.tokens_per_s,
                             **{f"itl_{k}": v for k, v in itl.items()}, **{f"read_{k}": v for k, v in reads.items()},
                             **{f"lag_{k}": v for k, v in stats_ms(lags).items()}, "errors": sum(res.errors.values()),
                             **{f"step_{k}": v for k, v in server_side.items()}})
                print(f"[tail] generation {option} rep {rep}: {rows[-1]}", flush=True)
    finally:
        for server in servers.values():
            server.stop()


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_scenario(report: Report, source: Path, p: Plan, names: list[str]) -> dict[str, Any]:
    section = report.section("Scenario 6 — tail latency: collector pauses, first burst, mosec")
    section.blocks.append(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    results: dict[str, list[dict[str, Any]]] = {"classification": [], "gc": [], "generation": []}
    for name in (n for n in names if n in REQUESTS):
        classification(name, source, p, results["classification"])
    if "digits-cnn" in names:  # ``--models charlm``: the generation cell alone
        gc_options(source, p, results["gc"])
    if "charlm" in names:
        generation(source, p, results["generation"])
    table = Table(["model", "protocol", "server", "rep", "req/s", "p50 ms", "p99 ms", "max ms", "p99 / p50",
                   "waited for a core, ms: server / generator", "server CPU µs / request",
                   "all 64 connects returned, ms", "errors"],
                  title=f"Classification at concurrency {CONCURRENCY} (rep 0 = first burst after ready)")
    for r in results["classification"]:
        table.add(r["model"], r["protocol"], r["server"], r["rep"], r["rps"], r["p50"], r["p99"], r["max"],
                  _ratio(r["p99"], r["p50"]), f"{r['waited']:.1f} / {r['gen_waited']:.1f}", r["cpu_us"],
                  r["connect_max"], r["errors"])
    section.blocks.append(table)
    table = Table(["collector", "rep", "req/s", "p50 ms", "p99 ms", "max ms", "p99 / p50", "full collections"],
                  title=f"Collector options: digits CNN, v2 JSON, concurrency {CONCURRENCY}, {REQUESTS['digits-cnn']} "
                        "requests per rep")
    for r in results["gc"]:
        table.add(r["option"], r["rep"], r["rps"], r["p50"], r["p99"], r["max"], _ratio(r["p99"], r["p50"]), r["gen2"])
    section.blocks.append(table)
    if results["generation"]:
        table = Table(["server", "rep", "tokens/s", "ITL p50 ms", "ITL p99 ms", "ITL max ms",
                       "between reads p50 / p99 / max ms", "p99 / p50 (reads)", "generator loop lag p99 / max ms",
                       "server step interval p50 / p99 ms", "p99 / p50 (server)", "errors"],
                      title=f"{MODELS['charlm'].describe}: streamed greedy tokens at concurrency {GEN_CONCURRENCY}, "
                            f"{4 * GEN_CONCURRENCY} requests per rep")
        for r in results["generation"]:
            reads = " / ".join("—" if r[f"read_{k}"] is None else f"{r[f'read_{k}']:.2f}" for k in ("p50", "p99", "max"))
            lag = "—" if r.get("lag_p99") is None else f"{r['lag_p99']:.2f} / {r['lag_max']:.2f}"
            steps = "—" if r.get("step_p50") is None else f"{r['step_p50']:.2f} / {r['step_p99']:.2f}"
            table.add(r["option"], r["rep"], r["tokens_per_s"], r["itl_p50"], r["itl_p99"], r["itl_max"], reads,
                      _ratio(r["read_p99"], r["read_p50"]), lag, steps, _ratio(r.get("step_p99"), r.get("step_p50")),
                      r["errors"])
        section.blocks.append(table)
    report.data["tail"] = results
    _targets(report, results)
    return results


def _stack_note(rows: list[dict[str, Any]], model: str, protocol: str, peer: dict[int, dict[str, Any]]) -> str:
    """The HTTP stack's own req/s over mosec's, paired as deepserve's are: the most deepserve could reach on it."""
    notes = []
    for side in (BARE_SIDE, ECHO_SIDE):
        ratios = [_ratio(r["rps"], peer[r["rep"]]["rps"]) for r in rows if r["server"] == side
                  and (r["model"], r["protocol"]) == (model, protocol) and r["rep"] in peer and r["rep"] > 0]
        if ratios:
            notes.append(f"{side} with no model: {float(np.median(ratios)):.2f}")
    return "; " + ", ".join(notes) if notes else ""


def _targets(report: Report, results: dict[str, list[dict[str, Any]]]) -> None:
    rows = results["classification"]
    for model, protocol in dict.fromkeys((r["model"], r["protocol"]) for r in rows):
        mine = [r for r in rows if r["server"] == "deepserve" and (r["model"], r["protocol"]) == (model, protocol)]
        worst = max(mine, key=lambda r: _ratio(r["p99"], r["p50"]) or float("inf"))
        ratio = _ratio(worst["p99"], worst["p50"])
        report.target(f"{model} {protocol} c={CONCURRENCY}: p99 / p50, worst repetition (first burst included)",
                      "<= 2.0", ratio, ratio is not None and ratio <= 2.0,
                      f"rep {worst['rep']}: p50 {worst['p50']:.1f} ms, p99 {worst['p99']:.1f} ms, "
                      f"max {worst['max']:.1f} ms; {len(mine)} repetitions")
        peer = {r["rep"]: r for r in rows if r["server"] == "mosec" and (r["model"], r["protocol"]) == (model, protocol)}
        pairs = [(r, peer[r["rep"]]) for r in mine if r["rep"] in peer and r["rep"] > 0]
        if pairs:
            rps = float(np.median([_ratio(a["rps"], b["rps"]) for a, b in pairs]))
            p99 = float(np.median([_ratio(a["p99"], b["p99"]) for a, b in pairs]))
            report.target(f"{model} {protocol} c={CONCURRENCY}: deepserve / mosec req/s (median of paired reps)",
                          ">= 1.0", rps, rps >= 1.0,
                          f"{len(pairs)} pairs, ABBA order" + _stack_note(rows, model, protocol, peer))
            report.target(f"{model} {protocol} c={CONCURRENCY}: deepserve / mosec p99 (median of paired reps)",
                          "<= 1.0", p99, p99 <= 1.0, f"{len(pairs)} pairs, ABBA order")
    shipped = [r for r in results["generation"] if r["option"] == "shipped"]
    if shipped:
        worst = max(shipped, key=lambda r: _ratio(r["read_p99"], r["read_p50"]) or float("inf"))
        ratio = _ratio(worst["read_p99"], worst["read_p50"])
        report.target(f"char-LM inter-token latency at c={GEN_CONCURRENCY}: p99 / p50 of the gaps between reads, "
                      "worst repetition", "<= 2.0", ratio, ratio is not None and ratio <= 2.0,
                      f"rep {worst['rep']}: between reads p50 {worst['read_p50']:.2f} ms, p99 {worst['read_p99']:.2f} "
                      f"ms, max {worst['read_max']:.2f} ms; all gaps p99 {worst['itl_p99']:.2f} ms")
