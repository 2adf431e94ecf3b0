"""Scenario 5: request latency while a model is being reloaded, against the same load in steady state.

The digits CNN takes JSON v2 infer requests at a fixed concurrency. In a "reload" cell a second thread reloads
the model back to back for the whole cell (``POST /v2/repository/models/{m}/load``: verify, open and warm a
new instance beside the serving one, switch, drain the old one); a "steady" cell is the same load alone.
The two alternate in paired rounds (the shared VM's speed drifts, and other work shares its cores), and the
ratio of p99s is the median over rounds of each round's ratio. Every request must succeed in both.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.classification import payloads
from benchmarks.common import Cell, Plan, measure, paired, paired_ratio
from benchmarks.loadgen import percentile
from benchmarks.models import serving_repository
from benchmarks.results import Report, Table
from benchmarks.servers import ServerProcess

MODEL = "digits-cnn"
CONCURRENCY = 16


class Reloader:
    """Reloads ``model`` back to back in a thread until stopped; counts reloads and failures."""

    def __init__(self, port: int, model: str) -> None:
        self.url = f"http://127.0.0.1:{port}/v2/repository/models/{model}/load"
        self.done = 0
        self.failed: list[str] = []
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reloader", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            request = urllib.request.Request(self.url, data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as r:
                    r.read()
            except OSError as e:  # urllib's HTTPError and connection errors are OSErrors
                self.failed.append(str(e))
                continue
            self.done += 1
            self.seconds.append(time.perf_counter() - started)

    def __enter__(self) -> Reloader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_scenario(report: Report, source: Path, p: Plan) -> dict[str, Any]:
    repository = serving_repository(source, {MODEL: (MODEL, {})})
    requests = payloads(MODEL, MODEL)["json"]
    seconds = max(4.0, 2 * p.cell_s)
    cells: dict[str, list[Cell]] = {"steady": [], "reload": []}
    reloads: list[Reloader] = []
    with ServerProcess("deepserve", repository=repository, device=p.device) as server:
        measure(server.port, requests, CONCURRENCY, p, duration_s=1.0)  # warm connections and caches

        def steady() -> float:
            cell = measure(server.port, requests, CONCURRENCY, p, server_pid=server.pid, duration_s=seconds)
            cells["steady"].append(cell)
            return cell.row()["p99_ms"] or 0.0

        def reloading() -> float:
            with Reloader(server.port, MODEL) as reloader:
                cell = measure(server.port, requests, CONCURRENCY, p, server_pid=server.pid, duration_s=seconds)
            reloads.append(reloader)
            cells["reload"].append(cell)
            return cell.row()["p99_ms"] or 0.0

        pairs = paired(reloading, steady, 1 if p.name == "quick" else 5)  # p99 of a few seconds is noisy
    return _report(report, cells, reloads, pairs, seconds)


def _report(report: Report, cells: dict[str, list[Cell]], reloads: list[Reloader], pairs: list[tuple[float, float]],
            seconds: float) -> dict[str, Any]:
    section = report.section("Scenario 5 — latency during a model reload")
    section.blocks.append(__doc__.split("\n\n")[1].replace("\n", " ") +
                          f" Concurrency {CONCURRENCY}, {seconds:.0f} s per cell, JSON infer of `{MODEL}`.")
    table = Table(["round", "state", "req/s", "p50 ms", "p99 ms", "errors", "reloads in the cell",
                   "reload s (median)", "CPU % srv / gen"])
    for i, (steady, reload, reloader) in enumerate(zip(cells["steady"], cells["reload"], reloads)):
        for state, cell, extra in (("steady", steady, ("", None)),
                                   ("reloading", reload, (reloader.done, percentile(reloader.seconds, 50)))):
            s = cell.row()
            table.add(i + 1, state, s["rps"], s["p50_ms"], s["p99_ms"], s["errors"], *extra,
                      f"{s['server_cpu_pct']:.0f} / {s['generator_cpu_pct']:.0f}")
    section.blocks.append(table)
    ratio = paired_ratio(pairs)
    errors = sum(sum(c.result.errors.values()) for c in cells["steady"] + cells["reload"])
    failed_reloads = sum(len(r.failed) for r in reloads)
    report.target(f"{MODEL}: p99 latency while reloading / steady p99, c={CONCURRENCY} (paired median)",
                  "reported; zero failed requests", ratio, errors == 0 and failed_reloads == 0,
                  f"{errors} failed requests, {failed_reloads} failed reloads, "
                  f"{sum(r.done for r in reloads)} reloads in all")
    data = {"pairs_p99_ms": pairs, "ratio": ratio, "errors": errors, "failed_reloads": failed_reloads,
            "cells": {k: [c.row() for c in v] for k, v in cells.items()}}
    report.data["rollout"] = data
    return data
