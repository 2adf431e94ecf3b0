"""``make reliability``: overload, a disconnect storm, SIGTERM under load, a soak and a hostile-input sweep against
``deepserve serve`` subprocesses on loopback, written to ``benchmarks/results/<date>-reliability.md``.

    python -m benchmarks.reliability [--soak-s 300] [--overload-s 8] [--only generation ...] [--out DIR]

Models are the benchmark's fixed-random-weight ResNet-18 (classification: the model, not HTTP, is the cost,
which is what admission control can act on) and char-LM (generation). Load is bounded: open-loop arrivals at
2x and 4x the measured capacity with at most 256 requests in flight, closed loops elsewhere. The load
generator shares the CPU with the server, so every number here is relative to the same run's unloaded and
capacity cells.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

from benchmarks.common import profile_server
from benchmarks.hostile import hostile_requests
from benchmarks.loadgen import Connection, LoadSpec, Request, json_request, percentile, run_load, run_open_loop
from benchmarks.models import example_image, prepare
from benchmarks.results import Report, Table

ROOT = Path(__file__).resolve().parent.parent
GEN_TOKENS = 32
CLASSIFY = "/v2/models/resnet18/infer"
GENERATE = "/v2/models/charlm/generate"


class Served:
    """``deepserve serve`` in a subprocess on a free loopback port; ready once ``/v2/health/ready`` is 200."""

    def __init__(self, repository: Path, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="reliability-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "deepserve.cli", "serve", "--repository", str(repository), "--port",
                   str(self.port), "--device", "cpu", "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log)
        delay = 0.05
        for _ in range(200):  # bounded: a few minutes at most
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
            if self.ready():
                return
            time.sleep(delay)  # waiting on another process: no event to wait on
            delay = min(delay * 2, 1.0)
        raise RuntimeError("server not ready in time")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/v2/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def spec(self, requests: list[Request], concurrency: int, seconds: float, **kw: Any) -> LoadSpec:
        return LoadSpec("127.0.0.1", self.port, tuple(requests), concurrency, seconds, 10**7, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode


@contextmanager
def served(repository: Path, *flags: str) -> Iterator[Served]:
    server = Served(repository, *flags)
    try:
        yield server
    finally:
        server.stop()


def classify_requests() -> list[Request]:
    out = []
    for seed in range(8):
        x = example_image("resnet18", seed)[None]
        out.append(json_request(CLASSIFY, {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                                       "data": x.ravel().tolist()}]}))
    return out


def generate_requests() -> list[Request]:
    prompts = ["The ", "In the ", "A function ", "When the "]
    return [json_request(GENERATE, {"text_input": p, "parameters": {"max_new_tokens": GEN_TOKENS,
                                                                     "temperature": 0.8, "seed": i}})
            for i, p in enumerate(prompts)]


def count_tokens(response: Any) -> int:
    return json.loads(response.body)["usage"]["completion_tokens"]


def _ms(values: list[float], q: float) -> float | None:
    p = percentile(values, q)
    return None if p is None else p * 1000


async def recovery_s(server: Served, request: Request, limit_s: float, within_s: float = 30.0) -> float | None:
    """Seconds after an overload until one request is answered 200 within ``limit_s``; None if not in time."""
    started = time.perf_counter()
    while time.perf_counter() - started < within_s:
        probe = LoadSpec("127.0.0.1", server.port, (request,), 1, 60.0, 1, timeout_s=30)
        result = await run_load(probe)
        if result.ok and result.latencies_s[0] <= limit_s:
            return time.perf_counter() - started
    return None


async def capacity_of(server: Served, requests: list[Request], levels: tuple[int, ...], seconds: float,
                      tokens: Any) -> tuple[Any, int]:
    """The closed-loop run with the best throughput over concurrency ``levels``, and its concurrency."""
    best, best_c = None, levels[0]
    for c in levels:
        r = await run_load(server.spec(requests, c, seconds, warmup_requests=c), tokens)
        if best is None or r.requests_per_s > best.requests_per_s:
            best, best_c = r, c
    return best, best_c


async def overload(server: Served, kind: str, requests: list[Request], levels: tuple[int, ...], seconds: float,
                   report: Report) -> list[Any]:
    """Unloaded (c=1), capacity (the best closed loop over ``levels``), then open loop at 2x and 4x capacity;
    the 4x cell is profiled."""
    tokens = count_tokens if kind == "generation" else None
    unloaded = await run_load(server.spec(requests, 1, seconds, warmup_requests=5), tokens)
    best, best_c = await capacity_of(server, requests, levels, seconds / len(levels), tokens)
    rps, cap = best.requests_per_s, best.tokens_per_s if tokens else best.requests_per_s
    unit = "tokens/s" if tokens else "req/s"
    p99_unloaded = percentile(unloaded.latencies_s, 99) or float("nan")
    # what a full server costs each request even without overload: the p99 target's floor
    p99_capacity = (percentile(best.latencies_s, 99) or float("nan")) / p99_unloaded
    table = Table(["offered", f"goodput {unit}", "goodput / capacity", "admitted p50 ms", "admitted p99 ms",
                   "p99 / unloaded p99", "shed", "Retry-After on shed", "other errors", "recovery s"],
                  title=f"{kind}: unloaded (c=1) p50 {_ms(unloaded.latencies_s, 50):.1f} ms, p99 "
                        f"{p99_unloaded * 1000:.1f} ms; capacity {cap:.0f} {unit} ({rps:.0f} req/s, closed loop, "
                        f"best of c={levels}: c={best_c}, p99 there {p99_capacity:.1f}x the unloaded p99)")
    profile = ""
    for factor in (2, 4):
        spec = server.spec(requests, 256, seconds, timeout_s=60, drain_s=30)
        if factor == 4:
            box: list[Any] = []
            profile = await asyncio.to_thread(profile_server, server.proc.pid, seconds, lambda: box.append(
                asyncio.run(run_open_loop(spec, factor * rps, tokens))))
            r = box[0]
        else:
            r = await run_open_loop(spec, factor * rps, tokens)
        good = r.tokens_per_s if tokens else r.requests_per_s
        p99 = percentile(r.latencies_s, 99)
        back = await recovery_s(server, requests[0], 2 * p99_unloaded)
        shed = r.errors["429"] + r.errors["503"]
        sent = r.ok + sum(v for k, v in r.errors.items() if k != "client-full")
        other = {k: v for k, v in r.errors.items() if k not in ("429", "503") and v}
        ratio = None if p99 is None else p99 / p99_unloaded
        table.add(f"{factor}x ({factor * rps:.0f} req/s)", good, good / cap if cap else None,
                  _ms(r.latencies_s, 50), _ms(r.latencies_s, 99), ratio, f"{shed / max(sent, 1):.0%}",
                  f"{r.refused_with_retry_after}/{shed}", other, back)
        report.target(f"{kind} at {factor}x offered: goodput / capacity", ">= 0.80",
                      good / cap if cap else None, bool(cap) and good / cap >= 0.8)
        report.target(f"{kind} at {factor}x offered: admitted p99 / unloaded p99", "<= 3", ratio,
                      ratio is not None and ratio <= 3,
                      note=f"at capacity without overload (closed loop c={best_c}) p99 is already "
                           f"{p99_capacity:.1f}x the unloaded p99")
        report.data[f"overload-{kind}-{factor}x"] = {"capacity": cap, "goodput": good, "p99_ratio": ratio, "p99_capacity_ratio": p99_capacity,
                                                     "errors": dict(r.errors)}
    return [table, f"4x {kind}, {profile}"]


async def running_rows(server: Served) -> float:
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"{server.base}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("deepserve_generation_running_rows{"))


async def disconnect_storm(server: Served, clients: int = 64) -> Table:
    """``clients`` streaming requests, each dropped after its first event; how long until no row runs."""
    body = json.dumps({"text_input": "The ", "parameters": {"max_new_tokens": 200}}).encode()
    head = (f"POST /v2/models/charlm/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    streams = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(clients)]
    for _, writer in streams:
        writer.write(head + body)
    for reader, _ in streams:
        await reader.readuntil(b"data:")  # generating
    peak = await running_rows(server)
    dropped = time.perf_counter()
    for _, writer in streams:
        writer.transport.abort()  # a reset, no goodbye
    rows, freed_s = peak, None
    while time.perf_counter() - dropped < 30:  # back-to-back scrapes, each a round trip: bounded
        rows = await running_rows(server)
        if rows == 0:
            freed_s = time.perf_counter() - dropped
            break
    table = Table(["clients dropped", "running rows before", "rows after", "rows freed in s"])
    table.add(clients, peak, rows, freed_s)
    return table


class Outcome(enum.Enum):
    """How one request fared around a SIGTERM, as the client saw it."""

    OK = "completed (200)"
    SHED = "shed 429"
    REFUSED_503 = "refused 503 + close"
    REFUSED_CONNECT = "refused at connect"
    RESET_NEW = "reset, first request on a new connection"
    RESET_REUSED = "reset, on a reused keep-alive connection"
    OTHER = "other"


async def sigterm_client(port: int, raw: bytes, stop_at: float, outcomes: list[tuple[float, Outcome]]) -> None:
    """One closed-loop client: keep-alive, reconnecting after a close or an error; each answer's outcome is
    recorded with its time, and whether a reset hit a fresh connection (the listen backlog, or a connection
    the server accepted but closed unanswered) or one that had been answered before."""
    conn = Connection("127.0.0.1", port)
    while time.perf_counter() < stop_at:
        reused = conn.writer is not None  # open only after an answer: errors and closes drop the connection
        try:
            response = await conn.send(raw, stream=False)
        except ConnectionRefusedError:
            outcomes.append((time.perf_counter(), Outcome.REFUSED_CONNECT))
            await asyncio.sleep(0.01)  # the server is gone: a client backs off before reconnecting
            continue
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            outcomes.append((time.perf_counter(), Outcome.RESET_REUSED if reused else Outcome.RESET_NEW))
            await conn.close()
            continue
        status = {200: Outcome.OK, 429: Outcome.SHED, 503: Outcome.REFUSED_503}.get(response.status, Outcome.OTHER)
        outcomes.append((time.perf_counter(), status))
    await conn.close()


async def sigterm_under_load(repository: Path, seconds: float, clients: int = 32) -> Table:
    """Closed-loop classification load; SIGTERM a third of the way in; how the answers and the exit went,
    before and after the signal."""
    server = Served(repository)
    raw = classify_requests()[0].encode("127.0.0.1", server.port)
    outcomes: list[tuple[float, Outcome]] = []
    stop_at = time.perf_counter() + seconds
    load = asyncio.gather(*(sigterm_client(server.port, raw, stop_at, outcomes) for _ in range(clients)))
    await asyncio.sleep(seconds / 3)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    code = await asyncio.to_thread(server.proc.wait, 120)
    drain_s = time.perf_counter() - signalled
    await load
    server.stop()
    table = Table(["outcome", "before SIGTERM", "after SIGTERM, during the drain", "after exit"],
                  title=f"closed loop c={clients}; exit code {code}; drain {drain_s:.2f} s")
    ended = signalled + drain_s
    for kind in Outcome:
        phases = [sum(1 for t, o in outcomes if o is kind and lo <= t < hi)
                  for lo, hi in ((0.0, signalled), (signalled, ended), (ended, float("inf")))]
        if any(phases) or kind in (Outcome.OK, Outcome.RESET_NEW, Outcome.RESET_REUSED):
            table.add(kind.value, *phases)
    return table


async def soak(server: Served, seconds: float, window_s: float = 10.0) -> tuple[Table, dict[str, Any]]:
    """Mixed closed-loop load (classification and generation) in 10 s windows; RSS and p99 of the first and
    last window."""
    requests = classify_requests()[:4] + generate_requests()[:2]
    windows = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        r = await run_load(server.spec(requests, 4, min(window_s, seconds), timeout_s=60))
        shed = r.errors.pop("429", 0)
        windows.append({"p99_ms": _ms(r.latencies_s, 99), "rss_mb": server.rss_mb(), "ok": r.ok, "shed": shed,
                        "errors": sum(r.errors.values()), "fivexx": sum(v for k, v in r.errors.items()
                                                                          if k.startswith("5"))})
    first, last = windows[0], windows[-1]
    table = Table(["duration s", "answered 200", "shed 429", "other errors", "5xx", "RSS first / last window MB",
                   "RSS drift", "p99 first / last window ms", "p99 drift"])
    table.add(time.perf_counter() - started, sum(w["ok"] for w in windows), sum(w["shed"] for w in windows),
              sum(w["errors"] for w in windows), sum(w["fivexx"] for w in windows),
              f"{first['rss_mb']:.0f} / {last['rss_mb']:.0f}",
              f"{last['rss_mb'] / first['rss_mb'] - 1:+.1%}", f"{first['p99_ms']:.1f} / {last['p99_ms']:.1f}",
              f"{last['p99_ms'] / first['p99_ms'] - 1:+.0%}")
    return table, {"windows": windows}


def sweep(server: Served) -> Table:
    """Every hostile request once; each answer must be a 4xx with a JSON error body; the server stays ready."""
    outcomes: dict[str, int] = {}
    bad = []
    with httpx.Client(base_url=server.base, timeout=30) as c:
        for name, method, path, kwargs in hostile_requests():
            r = c.request(method, path, **kwargs)
            ok = 400 <= r.status_code < 500 and r.headers.get("content-type", "").startswith("application/json")
            outcomes[str(r.status_code)] = outcomes.get(str(r.status_code), 0) + 1
            if not ok:
                bad.append(f"{name}: {r.status_code}")
    table = Table(["requests", "answers by status", "all 4xx with a JSON error", "not so", "ready after"])
    table.add(sum(outcomes.values()), dict(sorted(outcomes.items())), not bad, ", ".join(bad) or "none",
              server.ready())
    return table


def commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (run.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


SCENARIOS = ("classification", "generation", "storm", "sweep", "soak", "sigterm")


async def run_all(args: argparse.Namespace, repository: Path, report: Report) -> None:
    only = set(args.only or SCENARIOS)
    flags = ("--max-queue-wait-ms", str(args.max_queue_wait_ms)) if args.max_queue_wait_ms is not None else ()
    with served(repository, *flags) as server:
        over = report.section("Overload (open loop at 2x and 4x the measured capacity)")
        if "classification" in only:
            over.blocks += await overload(server, "classification", classify_requests(), (1, 2, 4),
                                          args.overload_s, report)
        if "generation" in only:
            over.blocks += await overload(server, "generation", generate_requests(), (4, 16, 32), args.overload_s,
                                          report)
        if "storm" in only:
            report.section("Disconnect storm").blocks.append(await disconnect_storm(server))
        if "sweep" in only:
            report.section("Hostile-input sweep").blocks.append(sweep(server))
        if "soak" in only:
            table, report.data["soak"] = await soak(server, args.soak_s)
            report.section(f"Soak ({args.soak_s:.0f} s, closed loop c=4, classification and generation)"
                           ).blocks.append(table)
    if "sigterm" in only:
        report.section("SIGTERM under load (closed loop c=32, classification)").blocks.append(
            await sigterm_under_load(repository, args.overload_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--soak-s", type=float, default=300.0, help="soak duration (default 300)")
    parser.add_argument("--overload-s", type=float, default=8.0, help="seconds per overload cell (default 8)")
    parser.add_argument("--max-queue-wait-ms", type=float, default=None,
                        help="the server's queue-delay budget during the run (default: the server's own)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=None,
                        help="run only these scenarios (default: all)")
    parser.add_argument("--models", type=Path, default=None, help="reuse exported benchmark models from here")
    args = parser.parse_args(argv)
    work = args.models or Path(tempfile.mkdtemp(prefix="reliability-models-"))
    models = work / "repository"
    prepare(models, work / "checkpoints", ["resnet18", "charlm"])
    report = Report("deepserve reliability", settings={"commit": commit(), "soak_s": args.soak_s,
                                                         "overload_s": args.overload_s,
                                                         "max_queue_wait_ms": args.max_queue_wait_ms})
    asyncio.run(run_all(args, models, report))
    path = report.write(args.out, f"{report.started:%Y-%m-%d}-reliability")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
