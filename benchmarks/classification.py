"""Scenarios 1 and 2: classification through the server, and the HTTP ceiling of the same stack.

Scenario 2 first: the echo app (``benchmarks.echo``) takes each protocol's payload at each concurrency. Then
one deepserve server serves every variant of a model at once — ``<model>-<backend>-b1`` (batching off,
``max_batch_size=1``) and ``<model>-<backend>-bN`` (batching on, the default settings) — and every
(variant, protocol, concurrency) cell is measured. Protocols: KServe v2 JSON, v2 with the binary tensor
extension (binary output too), and a raw PNG to ``/predictions/<model>``. One row per request.
The same runtime is timed in process with the server idle (the ceiling for ResNet-18's targets).

The ratios the targets are judged on are then measured again in paired rounds while the server is still up
(``benchmarks.common.paired``: the two sides alternate, back to back): server vs echo (the echo app is started
beside the server), server vs in-process, and batching on vs off in each model's cells where on was slower
in the sweep (the worst four). On a shared VM whose speed drifts from minute to minute, a ratio of numbers
measured minutes apart says more about the VM than about the server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Cell, Plan, backends, measure, paired, paired_ratio, profile_server
from benchmarks.loadgen import Request
from benchmarks.modellevel import classifier_runner, time_runner
from benchmarks.models import MODELS, example_image, serving_repository
from benchmarks.results import Plot, Report, Table
from benchmarks.servers import ServerProcess
from deepserve.clients.tensors import build_body, encode_inputs, png_bytes

PROTOCOLS = ("json", "binary", "image")
BACKENDS: tuple[str, ...] = ("onnx", "torchscript")
"""Set per run by ``benchmarks.common.backends`` (TorchScript only where ONNX Runtime cannot run)."""
BATCHING = {"off": {"max_batch_size": 1}, "on": {}}
CEILING_BATCHES = (1, 8, 16, 32, 64)
MAX_REMEASURED = 4
"""Per model, sweep cells where batching on was slower than off that are re-measured in paired rounds."""


def payloads(model: str, route: str, n: int = 4) -> dict[str, list[Request]]:
    """``n`` distinct pre-encoded requests per protocol for ``model`` served as ``route``."""
    out: dict[str, list[Request]] = {p: [] for p in PROTOCOLS}
    for seed in range(n):
        image = example_image(model, seed)  # (C,H,W) pixels in [0, 1]
        batch = ((image - 0.5) / 0.25)[None].astype(np.float32)  # what the graph takes: normalized, (1,C,H,W)
        specs, _ = encode_inputs({"images": batch}, binary=False)
        body, headers = build_body({"inputs": specs}, [])
        out["json"].append(Request("POST", f"/v2/models/{route}/infer", body, tuple(headers.items())))
        specs, chunks = encode_inputs({"images": batch}, binary=True)
        body, headers = build_body({"inputs": specs, "parameters": {"binary_data_output": True}}, chunks)
        out["binary"].append(Request("POST", f"/v2/models/{route}/infer", body, tuple(headers.items())))
        png = png_bytes(np.transpose(image, (1, 2, 0)))
        out["image"].append(Request("POST", f"/predictions/{route}", png, (("Content-Type", "image/png"),)))
    return out


def _row(table: Table, label: list[Any], cell: Cell, extra: list[Any] | None = None) -> None:
    s = cell.row()
    table.add(*label, s["rps"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["errors"], *(extra or []),
              f"{s['server_cpu_pct']:.0f} / {s['generator_cpu_pct']:.0f}")


def run_scenario(report: Report, source: Path, p: Plan, names: list[str], *, profile: bool = True) -> dict[str, Any]:
    global BACKENDS
    BACKENDS = backends(p.device)
    results: dict[str, Any] = {"echo": {}, "server": {}, "ceiling": {}, "paired": {}}
    _echo_sweep(report, results, names, p)
    section = report.section("Scenario 1 — classification through the server")
    section.blocks.append(__doc__.split("\n\n")[1].replace("\n", " ") +
                          " `ratio` is the server's req/s over the echo ceiling for the same payload and concurrency.")
    for name in names:
        section.blocks.append(_server_sweep(results, source, name, p, profile))
        section.blocks.extend(_model_figures(results, name, p))
    if results["paired"]:
        _paired_table(report, results, p)
    report.data["classification"] = {" / ".join(map(str, k)): v for part in ("echo", "server")
                                     for k, v in results[part].items()} | {
        "ceiling_s": {b: v["sweep"] for b, v in results["ceiling"].items()},
        "paired": {" / ".join(map(str, k)): v for k, v in results["paired"].items()}}
    _targets(report, results, p)
    return results


def _route(name: str, backend: str, batching: str) -> str:
    """The served name of one variant: ``<model>-<backend>-b1`` (batching off) or ``-bN`` (on)."""
    return f"{name}-{backend}-b{'1' if batching == 'off' else 'N'}"


def _echo_sweep(report: Report, results: dict[str, Any], names: list[str], p: Plan) -> None:
    """Scenario 2: every payload, protocol and concurrency against the echo app, into ``results["echo"]``."""
    echo_section = report.section("Scenario 2 — the HTTP ceiling (echo app, same stack)")
    echo_section.blocks.append(
        "A FastAPI route on the same uvicorn settings that reads the body and returns a fixed 10-class answer; "
        "same load generator, payloads and concurrency as scenario 1. CPU columns: server / load generator, "
        "percent of one core.")
    echo_table = Table(["payload", "protocol", "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors",
                        "CPU % srv / gen"])
    with ServerProcess("echo") as echo:
        for name in names:
            for protocol, requests in payloads(name, "echo").items():
                for c in p.concurrency:
                    cell = measure(echo.port, requests, c, p, server_pid=echo.pid)
                    results["echo"][(name, protocol, c)] = cell.row()
                    _row(echo_table, [name, protocol, c], cell)
    echo_section.blocks.append(echo_table)


def _server_sweep(results: dict[str, Any], source: Path, name: str, p: Plan, profile: bool) -> Table:
    """Scenario 1 for ``name``: one server with every variant, each (variant, protocol, concurrency) cell, then
    with the server still up the in-process ceiling (ResNet-18), the paired rounds and the profile."""
    variants = {_route(name, b, k): (name, {"backend": b, **v}) for b in BACKENDS for k, v in BATCHING.items()}
    repository = serving_repository(source, variants)
    table = Table(["backend", "batching", "protocol", "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms",
                   "errors", "ratio to echo", "CPU % srv / gen"], title=MODELS[name].describe)
    with ServerProcess("deepserve", repository=repository, device=p.device) as server:
        for backend in BACKENDS:
            for batching in BATCHING:
                for protocol, requests in payloads(name, _route(name, backend, batching)).items():
                    for c in p.concurrency:
                        cell = measure(server.port, requests, c, p, server_pid=server.pid)
                        row = cell.row()
                        echo_rps = results["echo"].get((name, protocol, c), {}).get("rps")
                        row["ratio"] = row["rps"] / echo_rps if echo_rps else None
                        results["server"][(name, backend, batching, protocol, c)] = row
                        _row(table, [backend, batching, protocol, c], cell, [row["ratio"]])
        if name == "resnet18":  # the in-process ceiling, measured with the server idle
            for backend in BACKENDS:
                results["ceiling"][backend] = _ceiling(source, name, backend, p)
        _paired_rounds(results, name, server, p)
        if profile:
            results.setdefault("profile", {})[name] = _profile(server, name, p)
    return table


def _profile(server: ServerProcess, name: str, p: Plan) -> str:
    """py-spy's view of the server while it serves the cell the targets hinge on."""
    protocol, c = _profile_cell(name, p)
    reqs = payloads(name, _route(name, BACKENDS[0], "on"))[protocol]
    return profile_server(server.pid, max(2.0, p.cell_s),
                          lambda: measure(server.port, reqs, c, p, duration_s=max(2.0, p.cell_s)))


def _model_figures(results: dict[str, Any], name: str, p: Plan) -> list[Plot | Table]:
    """The plots of ``name``'s sweep (req/s by concurrency, by protocol) and, for ResNet-18, the ceiling table."""
    c_max = max(p.concurrency)
    figures: list[Plot | Table] = [Plot(
        f"{name}-rps", f"{name}: req/s vs concurrency (v2 binary; echo = HTTP ceiling)",
        {**{f"{b} batching {k}": (list(p.concurrency),
                                  [results["server"][(name, b, k, "binary", c)]["rps"] for c in p.concurrency])
            for b in BACKENDS for k in BATCHING},
         "echo": (list(p.concurrency), [results["echo"][(name, "binary", c)]["rps"] for c in p.concurrency])},
        "concurrency", "requests/s"), Plot(
        f"{name}-protocols", f"{name}: req/s at concurrency {c_max} by protocol ({BACKENDS[0]})",
        {f"batching {k}": (list(PROTOCOLS), [results["server"][(name, BACKENDS[0], k, pr, c_max)]["rps"]
                                             for pr in PROTOCOLS]) for k in BATCHING}
        | {"echo": (list(PROTOCOLS), [results["echo"][(name, pr, c_max)]["rps"] for pr in PROTOCOLS])},
        "protocol", "requests/s", kind="bar")]
    if name == "resnet18":
        ceil = Table(["backend", *[f"batch {b}" for b in CEILING_BATCHES]],
                     title="ResNet-18 in process (server's runtime, same threads, server idle): ms per call (rows/s)")
        for backend, times in results["ceiling"].items():
            ceil.add(backend, *[f"{s * 1000:.3g} ({b / s:,.0f}/s)" for b, s in times["sweep"].items()])
        figures.append(ceil)
    return figures


def _paired_table(report: Report, results: dict[str, Any], p: Plan) -> None:
    """The section listing every paired-rounds measurement with its rounds and result."""
    paired_section = report.section("Paired rounds — the ratios the targets are judged on")
    paired_section.blocks.append(
        f"Each line alternates its two measurements back to back ({p.paired_rounds} rounds, ABBA order) while "
        "the server is up; the result is the median over rounds. Cells as in scenario 1 (same duration).")
    table = Table(["measurement", "first", "second", "rounds (first / second)", "result"])
    for entry in results["paired"].values():
        table.add(entry["what"], entry["first"], entry["second"],
                  "; ".join(f"{a:.4g} / {b:.4g}" for a, b in entry["pairs"]), entry["text"])
    paired_section.blocks.append(table)


def default_backend(device: str) -> str:
    """The backend the server's ``auto`` picks: ONNX Runtime on CPU, TorchScript on CUDA (where measured)."""
    preferred = "torchscript" if device == "cuda" else "onnx"
    return preferred if preferred in BACKENDS else BACKENDS[0]


def _ceiling(source: Path, name: str, backend: str, p: Plan) -> dict[str, Any]:
    """In-process seconds per call at each batch size (the sweep), plus the runner and its best batch for the
    paired rounds."""
    run, inputs = classifier_runner(source, name, backend, p.device)
    sweep = {b: time_runner(run, inputs(b), max(p.model_time_s, 0.5))[0] for b in CEILING_BATCHES}
    best = max(sweep, key=lambda b: b / sweep[b])
    return {"sweep": sweep, "run": run, "inputs": inputs, "best_batch": best}


def _paired_rounds(results: dict[str, Any], name: str, server: ServerProcess, p: Plan) -> None:
    """Re-measure, in alternating rounds, the ratios the targets of ``name`` are judged on."""
    server_rows, c_max, rounds = results["server"], max(p.concurrency), p.paired_rounds

    def rps(route: str, protocol: str, c: int, port: int | None = None) -> Callable[[], float]:
        reqs = payloads(name, route)[protocol]
        return lambda: measure(port or server.port, reqs, c, p).row()["rps"]

    def record(key: tuple, what: str, first: str, second: str, pairs: list[tuple[float, float]],
               diff: bool = False) -> None:
        value = (_median([a - b for a, b in pairs]) if diff else paired_ratio(pairs)) if pairs else None
        text = "—" if value is None else (f"{value:+.2f} ms" if diff else f"{value:.2f}")
        results["paired"][key] = {"what": what, "first": first, "second": second, "pairs": pairs,
                                  "value": value, "text": text}

    cells = [(k, v["rps"] / off["rps"]) for k, v in server_rows.items() if k[0] == name and k[2] == "on"
             and (off := server_rows[(k[0], k[1], "off", k[3], k[4])])["rps"]]
    slower = sorted((kv for kv in cells if kv[1] < 1.0), key=lambda kv: kv[1])
    for (_, backend, _, protocol, c), _ in slower[:MAX_REMEASURED]:
        pairs = paired(rps(f"{name}-{backend}-bN", protocol, c), rps(f"{name}-{backend}-b1", protocol, c), rounds)
        record(("onoff", name, backend, protocol, c), f"{name} {backend} {protocol} c={c}: batching on / off",
               "on req/s", "off req/s", pairs)
    if name == "digits-cnn":
        with ServerProcess("echo") as echo:
            backend = default_backend(p.device)  # what a user gets; sweep cells are too noisy to choose by
            for protocol in PROTOCOLS:
                pairs = paired(rps(f"{name}-{backend}-bN", protocol, c_max), rps("echo", protocol, c_max, echo.port),
                               rounds)
                record(("echo", protocol), f"digits CNN {protocol} c={c_max}: server ({backend}, batching on) / echo",
                       "server req/s", "echo req/s", pairs)
    for backend, ceiling in results["ceiling"].items() if name == "resnet18" else ():
        run, best = ceiling["run"], ceiling["best_batch"]
        feeds_best, feeds_one = ceiling["inputs"](best), ceiling["inputs"](1)
        budget = max(p.model_time_s, 0.5)
        pairs = paired(rps(f"{name}-{backend}-bN", "binary", c_max),
                       lambda: best / time_runner(run, feeds_best, budget)[0], rounds)
        record(("ceiling", backend), f"ResNet-18 {backend} binary c={c_max}: server req/s / in-process rows/s "
               f"(batch {best})", "server req/s", "in-process rows/s", pairs)
        reqs = payloads(name, f"{name}-{backend}-b1")["binary"]
        pairs = paired(lambda: measure(server.port, reqs, 1, p).row()["p50_ms"] or 0.0,
                       lambda: 1000 * time_runner(run, feeds_one, budget)[0], rounds)
        record(("latency", backend), f"ResNet-18 {backend} batch 1: server p50 - in-process (binary, c=1, "
               "batching off)", "server p50 ms", "in-process ms", pairs, diff=True)


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _profile_cell(name: str, p: Plan) -> tuple[str, int]:
    """The cell the targets hinge on: JSON at the highest concurrency."""
    return "json", max(p.concurrency)


def _targets(report: Report, results: dict[str, Any], p: Plan) -> None:
    server, pairs, c = results["server"], results["paired"], max(p.concurrency)
    profiles = results.get("profile", {})
    for protocol in PROTOCOLS:
        entry = pairs.get(("echo", protocol))
        if entry is None:
            continue
        ratio, missed = entry["value"], entry["value"] is not None and entry["value"] < 0.70
        server_rps = _median([a for a, _ in entry["pairs"]])
        echo_rps = _median([b for _, b in entry["pairs"]])
        report.target(f"digits CNN, {protocol}: server req/s at c={c} / echo ceiling", ">= 0.70", ratio,
                      None if ratio is None else not missed,
                      f"paired rounds: {entry['what'].split(': ', 1)[1]}, medians {server_rps:.0f} vs "
                      f"{echo_rps:.0f} req/s" + (f". {profiles['digits-cnn']}" if missed and "digits-cnn" in profiles
                                                 else ""))
    ratios = {k: v["rps"] / server[(k[0], k[1], "off", k[3], k[4])]["rps"]
              for k, v in server.items() if k[2] == "on" and server[(k[0], k[1], "off", k[3], k[4])]["rps"]}
    remeasured = {(k[1], k[2], "on", k[3], k[4]): v["value"] for k, v in pairs.items()
                  if k[0] == "onoff" and v["value"] is not None}
    ratios.update(remeasured)
    if ratios:
        worst = min(ratios, key=ratios.__getitem__)
        ratio = ratios[worst]
        how = "paired rounds" if worst in remeasured else "sweep cell"
        report.target("batching on / off req/s, worst cell (all models, backends, protocols, concurrencies)",
                      ">= 1.00", ratio, ratio >= 1.0,
                      f"worst: {' '.join(map(str, (worst[0], worst[1], worst[3], worst[4])))} ({how}); "
                      f"{len(remeasured)} cells re-measured in paired rounds, the rest from the sweep")
    for backend in results["ceiling"]:
        entry, lat = pairs.get(("ceiling", backend)), pairs.get(("latency", backend))
        if entry is not None:
            ratio = entry["value"]
            report.target(f"ResNet-18 {backend}: server req/s at c={c} (binary) / in-process batched rows/s",
                          ">= 0.90", ratio, None if ratio is None else ratio >= 0.90,
                          f"paired rounds (in-process at its best batch, {results['ceiling'][backend]['best_batch']}): "
                          f"medians {_median([a for a, _ in entry['pairs']]):.0f} req/s vs "
                          f"{_median([b for _, b in entry['pairs']]):.0f} rows/s"
                          + (f". {profiles['resnet18']}" if ratio is not None and ratio < 0.90
                             and "resnet18" in profiles else ""))
        if lat is not None:
            extra = lat["value"]
            report.target(f"ResNet-18 {backend}: batch-1 p50 through the server minus in process (binary, c=1)",
                          "<= 3 ms", extra, None if extra is None else extra <= 3.0,
                          f"paired rounds: medians {_median([a for a, _ in lat['pairs']]):.2f} ms vs "
                          f"{_median([b for _, b in lat['pairs']]):.2f} ms")
    if p.device == "cuda" and any(k[0] == "resnet18" for k in server):
        on = max(server[("resnet18", b, "on", "binary", c)]["rps"] for b in BACKENDS)
        off = max(server[("resnet18", b, "off", "binary", c)]["rps"] for b in BACKENDS)
        report.target(f"GPU: ResNet-18 batching on / off req/s at c={c}", ">= 4.0", on / off if off else None,
                      bool(off) and on / off >= 4.0, f"{on:.0f} vs {off:.0f} req/s (binary, best backend)")
