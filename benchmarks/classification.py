"""Scenarios 1 and 2: classification through the server, and the HTTP ceiling of the same stack.

Scenario 2 first: the echo app (``benchmarks.echo``) takes each protocol's payload at each concurrency. Then
one deepserve server serves every variant of a model at once — ``<model>-<backend>-b1`` (batching off,
``max_batch_size=1``) and ``<model>-<backend>-bN`` (batching on, the default settings) — and every
(variant, protocol, concurrency) cell is measured. Protocols: KServe v2 JSON, v2 with the binary tensor
extension (binary output too), and a raw PNG to ``/predictions/<model>``. One row per request.
Afterwards the same runtime is timed in process (the ceiling for ResNet-18's targets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Cell, Plan, backends, measure, profile_server
from benchmarks.loadgen import Request
from benchmarks.modellevel import classifier_ceiling
from benchmarks.models import MODELS, example_image, serving_repository
from benchmarks.results import Plot, Report, Table
from benchmarks.servers import ServerProcess
from deepserve.clients.tensors import build_body, encode_inputs, png_bytes

PROTOCOLS = ("json", "binary", "image")
BACKENDS: tuple[str, ...] = ("onnx", "torchscript")
"""Set per run by ``benchmarks.common.backends`` (TorchScript only where ONNX Runtime cannot run)."""
BATCHING = {"off": {"max_batch_size": 1}, "on": {}}


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


def _single_client_note(pairs: list[tuple[tuple, float, float]]) -> str:
    """At concurrency 1 an idle batcher dispatches at once, so on and off run the same path there."""
    single = [(on, off) for key, on, off in pairs if key[4] == 1]
    wins = sum(on >= off for on, off in single)
    return (f"; at concurrency 1 batching on was >= off in {wins} of {len(single)} cells — an idle batcher does "
            "not wait for company, so these gaps are the spread between short cells, not waiting")


def run_scenario(report: Report, source: Path, p: Plan, names: list[str], *, profile: bool = True) -> dict[str, Any]:
    global BACKENDS
    BACKENDS = backends(p.device)
    results: dict[str, Any] = {"echo": {}, "server": {}, "ceiling": {}}
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

    section = report.section("Scenario 1 — classification through the server")
    section.blocks.append(__doc__.split("\n\n")[1].replace("\n", " ") +
                          " `ratio` is the server's req/s over the echo ceiling for the same payload and concurrency.")
    for name in names:
        variants = {f"{name}-{b}-b{'1' if k == 'off' else 'N'}": (name, {"backend": b, **v})
                    for b in BACKENDS for k, v in BATCHING.items()}
        repository = serving_repository(source, variants)
        table = Table(["backend", "batching", "protocol", "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms",
                       "errors", "ratio to echo", "CPU % srv / gen"], title=MODELS[name].describe)
        with ServerProcess("deepserve", repository=repository, device=p.device) as server:
            for backend in BACKENDS:
                for batching in BATCHING:
                    route = f"{name}-{backend}-b{'1' if batching == 'off' else 'N'}"
                    for protocol, requests in payloads(name, route).items():
                        for c in p.concurrency:
                            cell = measure(server.port, requests, c, p, server_pid=server.pid)
                            row = cell.row()
                            echo_rps = results["echo"].get((name, protocol, c), {}).get("rps")
                            row["ratio"] = row["rps"] / echo_rps if echo_rps else None
                            results["server"][(name, backend, batching, protocol, c)] = row
                            _row(table, [backend, batching, protocol, c], cell, [row["ratio"]])
            if profile:
                results["profile"] = results.get("profile", {})
                worst = _profile_cell(name, p)
                route = f"{name}-{BACKENDS[0]}-bN"
                reqs = payloads(name, route)[worst[0]]
                results["profile"][name] = profile_server(
                    server.pid, max(2.0, p.cell_s), lambda: measure(server.port, reqs, worst[1], p, duration_s=max(2.0, p.cell_s)))
        section.blocks.append(table)
        c_max = max(p.concurrency)
        section.blocks.append(Plot(
            f"{name}-rps", f"{name}: req/s vs concurrency (v2 binary; echo = HTTP ceiling)",
            {**{f"{b} batching {k}": (list(p.concurrency),
                                      [results["server"][(name, b, k, "binary", c)]["rps"] for c in p.concurrency])
                for b in BACKENDS for k in BATCHING},
             "echo": (list(p.concurrency), [results["echo"][(name, "binary", c)]["rps"] for c in p.concurrency])},
            "concurrency", "requests/s"))
        section.blocks.append(Plot(
            f"{name}-protocols", f"{name}: req/s at concurrency {c_max} by protocol ({BACKENDS[0]})",
            {f"batching {k}": (list(PROTOCOLS), [results["server"][(name, BACKENDS[0], k, pr, c_max)]["rps"]
                                                 for pr in PROTOCOLS]) for k in BATCHING}
            | {"echo": (list(PROTOCOLS), [results["echo"][(name, pr, c_max)]["rps"] for pr in PROTOCOLS])},
            "protocol", "requests/s", kind="bar"))
        if name == "resnet18":  # the in-process ceiling, measured with the server stopped
            for backend in BACKENDS:
                results["ceiling"][backend] = classifier_ceiling(source, name, backend, p.device, (1, 8, 16, 32, 64),
                                                                 max(p.model_time_s, 0.5))
            ceil = Table(["backend", *[f"batch {b}" for b in (1, 8, 16, 32, 64)]],
                         title="ResNet-18 in process (server's runtime, same threads): ms per call (rows/s)")
            for backend, times in results["ceiling"].items():
                ceil.add(backend, *[f"{s * 1000:.3g} ({b / s:,.0f}/s)" for b, s in times.items()])
            section.blocks.append(ceil)
    report.data["classification"] = {" / ".join(map(str, k)): v for part in ("echo", "server")
                                     for k, v in results[part].items()} | {"ceiling_s": results["ceiling"]}
    _targets(report, results, p)
    return results


def _profile_cell(name: str, p: Plan) -> tuple[str, int]:
    """The cell the targets hinge on: JSON at the highest concurrency."""
    return "json", max(p.concurrency)


def _targets(report: Report, results: dict[str, Any], p: Plan) -> None:
    server, echo, c = results["server"], results["echo"], max(p.concurrency)
    profiles = results.get("profile", {})
    if any(k[0] == "digits-cnn" for k in server):
        for protocol in PROTOCOLS:
            best = max((server[("digits-cnn", b, "on", protocol, c)]["rps"], b) for b in BACKENDS)
            ceiling = echo[("digits-cnn", protocol, c)]["rps"]
            ratio = best[0] / ceiling if ceiling else None
            missed = ratio is not None and ratio < 0.70
            report.target(f"digits CNN, {protocol}: server req/s at c={c} / echo ceiling", ">= 0.70", ratio,
                          None if ratio is None else not missed,
                          f"{best[0]:.0f} req/s ({best[1]}, batching on) vs echo {ceiling:.0f} req/s"
                          + (f". {profiles['digits-cnn']}" if missed and "digits-cnn" in profiles else ""))
    pairs = [(k, v["rps"], server[(k[0], k[1], "off", k[3], k[4])]["rps"]) for k, v in server.items() if k[2] == "on"]
    if pairs:
        worst = min(pairs, key=lambda t: t[1] / t[2] if t[2] else float("inf"))
        ratio = worst[1] / worst[2] if worst[2] else None
        report.target("batching on / off req/s, worst cell (all models, backends, protocols, concurrencies)",
                      ">= 1.00", ratio, None if ratio is None else ratio >= 1.0,
                      f"worst: {' '.join(map(str, worst[0]))} ({worst[1]:.0f} vs {worst[2]:.0f} req/s)"
                      + (_single_client_note(pairs) if ratio is not None and ratio < 1.0 and worst[0][4] == 1 else ""))
    if results["ceiling"]:
        for backend, times in results["ceiling"].items():
            in_proc = max(b / s for b, s in times.items())
            rps = server[("resnet18", backend, "on", "binary", c)]["rps"]
            ratio = rps / in_proc
            report.target(f"ResNet-18 {backend}: server req/s at c={c} (binary) / in-process batched rows/s",
                          ">= 0.90", ratio, ratio >= 0.90,
                          f"{rps:.0f} req/s vs {in_proc:.0f} rows/s in process (best batch)"
                          + (f". {profiles['resnet18']}" if ratio < 0.90 and "resnet18" in profiles else ""))
            lat = server[("resnet18", backend, "off", "binary", 1)]["p50_ms"]
            extra = lat - times[1] * 1000 if lat is not None else None
            report.target(f"ResNet-18 {backend}: batch-1 p50 through the server minus in process (binary, c=1)",
                          "<= 3 ms", extra, None if extra is None else extra <= 3.0,
                          f"server p50 {lat:.2f} ms vs in process {times[1] * 1000:.2f} ms" if extra is not None else "")
    if p.device == "cuda" and any(k[0] == "resnet18" for k in server):
        on = max(server[("resnet18", b, "on", "binary", c)]["rps"] for b in BACKENDS)
        off = max(server[("resnet18", b, "off", "binary", c)]["rps"] for b in BACKENDS)
        report.target(f"GPU: ResNet-18 batching on / off req/s at c={c}", ">= 4.0", on / off if off else None,
                      bool(off) and on / off >= 4.0, f"{on:.0f} vs {off:.0f} req/s (binary, best backend)")
