"""Scenario 3: generation (char-LM and seq2seq) through the server, and the seq2seq engine in process.

Every request generates exactly ``N`` tokens (``min_new_tokens = max_new_tokens = N``), so tokens/s compare
like with like. Each model is served twice, or three times: ``<model>-cb`` with the default continuous
batching (``max_running_rows`` 64) and ``<model>-one`` / ``<model>-one4`` with room for one request's row
group only (``max_running_rows`` 1 for greedy and sampling, 4 for beam 4). Throughput (tokens/s, the
continuous-vs-one-at-a-time target) is measured on ``/generate``, whole answers; ``greedy-stream`` runs the
same greedy requests over ``/generate_stream`` (server-sent events) for time to first token and time per
output token, where every token is one event on the wire.

In process: ``GenerationServable`` (the server's engine, no HTTP) decodes 32 concurrent seq2seq requests of 32
source tokens with beam 4; target tokens/s = tokens of the returned sequences / wall time.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Plan, backends, measure, paired, paired_ratio
from benchmarks.loadgen import Request, Response, json_request, percentile
from benchmarks.models import MODELS, corpus_lines, manifest, serving_repository
from benchmarks.results import Plot, Report, Table
from benchmarks.servers import ServerProcess

MODES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "sample": {"temperature": 0.8, "top_p": 0.95},
    "beam4": {"num_beams": 4},
    "greedy-stream": {"temperature": 0.0},
}
STREAMED = {"greedy-stream"}


def prompts(model: str, n: int = 8, source_tokens: int = 32) -> list[str]:
    """Char-LM: short English openings. Seq2seq: English lines cut to ``source_tokens`` BPE pieces."""
    lines = corpus_lines(200)
    if model == "charlm":
        return [line[:24] for line in lines[:n]]
    return [_cut(line, source_tokens) for line in lines[:n]]


_SPM: Any = None


def set_tokenizer(model_file: Path) -> None:
    global _SPM
    import sentencepiece as spm

    _SPM = spm.SentencePieceProcessor(model_file=str(model_file))


def _cut(text: str, tokens: int) -> str:
    """``text`` cut to its first ``tokens`` pieces (repeated when too short)."""
    if _SPM is None:
        return text
    ids: list[int] = []
    while len(ids) < tokens:
        ids += _SPM.encode(text + " ")
    return _SPM.decode(ids[:tokens])


def token_counter(n: int):
    """Tokens in one answer: the server's ``usage.completion_tokens`` when given, else the forced ``n``."""

    def count(response: Response) -> int:
        if response.events:
            return n  # streams: every request generates exactly n (min_new_tokens = max_new_tokens)
        try:
            return int(json.loads(response.body)["usage"]["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            return n

    return count


def requests_for(route: str, texts: list[str], mode: str, n: int) -> list[Request]:
    stream = mode in STREAMED
    path = f"/v2/models/{route}/generate_stream" if stream else f"/v2/models/{route}/generate"
    params = {"max_new_tokens": n, "min_new_tokens": n, **MODES[mode]}
    out = []
    for i, text in enumerate(texts):
        p = dict(params)
        if mode == "sample":
            p["seed"] = i
        out.append(json_request(path, {"text_input": text, "parameters": p}))
    return out


def run_scenario(report: Report, source: Path, p: Plan, names: list[str]) -> dict[str, Any]:
    section = report.section("Scenario 3 — generation")
    section.blocks.append(__doc__.split("\n\n")[1].replace("\n", " ") + f" N = {p.gen_tokens}.")
    results: dict[tuple, dict[str, Any]] = {}
    if "seq2seq" in names:
        set_tokenizer(source / "seq2seq" / "1" / manifest(source, "seq2seq").tokenizer["file"])
    for name in names:
        variants = {f"{name}-cb": (name, {}), f"{name}-one": (name, {"max_running_rows": 1}),
                    f"{name}-one4": (name, {"max_running_rows": 4})}
        repository = serving_repository(source, variants)
        texts = prompts(name)
        table = Table(["mode", "batching", "concurrency", "tokens/s", "req/s", "p50 ms", "p99 ms", "TTFT p50 ms",
                       "TPOT p50 ms", "errors", "CPU % srv / gen"], title=MODELS[name].describe)
        with ServerProcess("deepserve", repository=repository, device=p.device) as server:
            for mode in MODES:
                for batching in ("continuous", "one-at-a-time"):
                    route = f"{name}-cb" if batching == "continuous" else f"{name}-one4" if mode == "beam4" else f"{name}-one"
                    reqs = requests_for(route, texts, mode, p.gen_tokens)
                    for c in p.gen_concurrency:
                        cell = measure(server.port, reqs, c, p, server_pid=server.pid, stream=mode in STREAMED,
                                       count_tokens=token_counter(p.gen_tokens), warmup=min(c, 8))
                        s = cell.row()
                        results[(name, mode, batching, c)] = s
                        table.add(mode, batching, c, s["tokens_per_s"], s["rps"], s["p50_ms"], s["p99_ms"],
                                  s["ttft_p50_ms"], s["tpot_p50_ms"], s["errors"],
                                  f"{s['server_cpu_pct']:.0f} / {s['generator_cpu_pct']:.0f}")
        section.blocks.append(table)
        section.blocks.append(Plot(
            f"{name}-tokens", f"{name}: output tokens/s vs concurrency",
            {f"{m} {b}": (list(p.gen_concurrency), [results[(name, m, b, c)]["tokens_per_s"] for c in p.gen_concurrency])
             for m in MODES for b in ("continuous", "one-at-a-time")}, "concurrency", "tokens/s", logy=True))
    report.data["generation"] = {" / ".join(map(str, k)): v for k, v in results.items()}
    c = max(p.gen_concurrency)
    if "charlm" in names:
        for mode in ("greedy", "sample"):
            cb, one = results[("charlm", mode, "continuous", c)], results[("charlm", mode, "one-at-a-time", c)]
            ratio = cb["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else None
            report.target(f"char-LM {mode}: continuous / one-at-a-time tokens/s at c={c}", ">= 10", ratio,
                          None if ratio is None else ratio >= 10,
                          f"{cb['tokens_per_s']:.0f} vs {one['tokens_per_s']:.0f} tokens/s")
    return {"http": results}


async def _engine_run(directory: Path, requests: int, source_tokens: int, new_tokens: int, device: str,
                      backend: str, precision: str = "fp32", waves: int = 1, beams: int = 4) -> dict[str, Any]:
    """``waves`` times, ``requests`` requests (beam search of ``beams``, or greedy for 1) submitted at once to one
    loaded engine; the median wave."""
    from deepserve.manifest import load_manifest
    from deepserve.serve.generation.engine import GenerationServable
    from deepserve.serve.settings import ModelSettings

    m = load_manifest(directory, verify=False)
    settings = ModelSettings(backend=backend, precision=precision, max_running_rows=max(64, 4 * requests))
    servable = GenerationServable(m, directory, settings, device)
    await servable.start()
    await servable.warmup()
    texts = [_cut(t, source_tokens) for t in corpus_lines(requests)]
    params = {"num_beams": beams, "temperature": 0.0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    rates, walls = [], []
    try:
        await asyncio.gather(*(servable.generate(t, params) for t in texts[:4]))  # warm the batch shapes
        for _ in range(waves):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(servable.generate(t, params) for t in texts))
            walls.append(time.perf_counter() - t0)
            rates.append(sum(r.completion_tokens for r in results) / walls[-1])
    finally:
        await servable.stop()
    tokens = sum(r.completion_tokens for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    middle = sorted(range(waves), key=rates.__getitem__)[waves // 2]
    return {"backend": backend, "precision": precision, "requests": requests,
            "source_tokens_mean": prompt / len(results), "target_tokens": tokens, "wall_s": walls[middle],
            "tokens_per_s": rates[middle], "waves_tokens_per_s": rates}


def _engine_variants(source: Path, device: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs to run: fp32 on every backend, plus ONNX Runtime int8 where exported."""
    variants = [(b, "fp32") for b in backends(device)]
    if device == "cpu" and "onnx" in backends(device) and "onnx-int8" in manifest(source, "seq2seq").graphs["decode_step"].files:
        variants.append(("onnx", "int8"))
    return variants


def run_engine(report: Report, source: Path, p: Plan) -> dict[str, Any]:
    """The in-process seq2seq engine target (beam 4, 32 concurrent requests of 32 source tokens)."""
    section = report.section("Scenario 3b — seq2seq engine in process (beam 4)")
    set_tokenizer(source / "seq2seq" / "1" / manifest(source, "seq2seq").tokenizer["file"])
    table = Table(["backend", "precision", "requests", "source tokens (mean)", "target tokens", "wall s",
                   "target tokens/s (median)", "every wave"])
    runs = {}
    for backend, precision in _engine_variants(source, p.device):
        run = asyncio.run(_engine_run(source / "seq2seq" / "1", 32, 32, p.gen_tokens, p.device, backend,
                                      precision, waves=p.paired_rounds))
        runs[f"{backend}-{precision}"] = run
        table.add(backend, precision, run["requests"], run["source_tokens_mean"], run["target_tokens"],
                  run["wall_s"], run["tokens_per_s"], ", ".join(f"{r:.0f}" for r in run["waves_tokens_per_s"]))
    section.blocks.append(f"{MODELS['seq2seq'].describe}; every request generates {p.gen_tokens} target tokens "
                          f"(min_new_tokens = max_new_tokens), 4 beams each, all 32 submitted at once, "
                          f"{p.paired_rounds} waves on one loaded engine (the median is reported). int8: the "
                          "artifact's dynamically quantized ONNX graphs (int8 weights), the mode C++ engines such as "
                          "CTranslate2 are usually run in on CPU.")
    section.blocks.append(table)
    name = "seq2seq engine in process, beam 4, 32 x 32-token sources: target tokens/s"
    fp32 = max((r for r in runs.values() if r["precision"] == "fp32"), key=lambda r: r["tokens_per_s"])
    report.target(f"{name} (fp32)", ">= 2000 (C++-engine class)", fp32["tokens_per_s"],
                  fp32["tokens_per_s"] >= 2000, f"best backend {fp32['backend']}")
    if "onnx-int8" in runs:
        int8 = runs["onnx-int8"]
        report.target(f"{name} (int8 weights)", ">= 2000 (C++-engine class)", int8["tokens_per_s"],
                      int8["tokens_per_s"] >= 2000, "onnx, dynamically quantized graphs")
    report.data["engine"] = runs
    return runs


OVERLOAD_FACTORS = (1, 2, 4)
"""Offered load as multiples of the measured capacity."""


def _overload_cell(port: int, reqs: list[Request], rate: float, seconds: float, n: int) -> dict[str, Any]:
    from benchmarks.loadgen import LoadSpec, run_open_loop

    spec = LoadSpec("127.0.0.1", port, tuple(reqs), 1024, seconds, 100000, drain_s=30.0)
    result = asyncio.run(run_open_loop(spec, rate, token_counter(n)))
    offered = int(seconds * rate)
    return {**result.summary(), "offered": offered, "shed": result.errors.get("429", 0) / max(1, offered)}


async def _engine_overload(directory: Path, n: int, rows: int, seconds: float, factor: float) -> dict[str, Any]:
    """The same measurement without HTTP: ``GenerationServable`` in process, a closed loop of ``rows`` requests
    (capacity) and then open-loop submissions at ``factor`` times its request rate. What admission itself
    achieves, apart from the event loop and the load generator competing for the cores."""
    from deepserve.manifest import load_manifest
    from deepserve.serve.errors import Overloaded, ServeError
    from deepserve.serve.generation.engine import GenerationServable
    from deepserve.serve.settings import ModelSettings

    servable = GenerationServable(load_manifest(directory, verify=False), directory,
                                  ModelSettings(max_running_rows=rows), "cpu")
    await servable.start()
    await servable.warmup()
    params, text = {"temperature": 0.0, "max_new_tokens": n, "min_new_tokens": n}, prompts("charlm")[0]
    out: dict[str, Any] = {}

    async def timed(job_or_text: Any, kept: list[float]) -> int:
        t0 = time.perf_counter()
        result = await (servable.generate(job_or_text, params) if isinstance(job_or_text, str)
                        else servable.wait(job_or_text))
        kept.append(time.perf_counter() - t0)
        return result.completion_tokens

    try:
        lat: list[float] = []
        t0, end = time.perf_counter(), time.perf_counter() + seconds

        async def worker() -> int:
            tokens = 0
            while time.perf_counter() < end:
                tokens += await timed(text, lat)
            return tokens

        tokens = sum(await asyncio.gather(*(worker() for _ in range(rows))))
        wall = time.perf_counter() - t0
        out["capacity"] = {"tokens_per_s": tokens / wall, "rps": len(lat) / wall, "p99_ms": 1000 * percentile(lat, 99)}
        rate, lat2, tasks, shed = factor * len(lat) / wall, [], [], 0
        start, count = time.perf_counter(), int(seconds * factor * len(lat) / wall)
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            try:
                tasks.append(asyncio.ensure_future(timed(servable.submit(text, params), lat2)))
            except Overloaded:
                shed += 1
        done = await asyncio.gather(*tasks, return_exceptions=True)
        wall = max(time.perf_counter() - start, seconds)
        good = sum(t for t in done if isinstance(t, int))
        out["offered"] = {"tokens_per_s": good / wall, "p99_ms": 1000 * (percentile(lat2, 99) or float("inf")),
                          "shed": shed / max(1, count), "failed": sum(isinstance(t, ServeError) for t in done)}
    finally:
        await servable.stop()
    return out


def run_overload(report: Report, source: Path, p: Plan) -> dict[str, Any]:
    """Char-LM goodput under overload: capacity (a closed loop that keeps ``max_running_rows`` requests in flight)
    and open-loop arrivals at 1, 2 and 4 times the capacity's request rate, each overloaded cell paired with a
    capacity cell measured just before or after it (ABBA order over the rounds)."""
    section = report.section("Scenario 3c — generation under overload (char-LM, greedy)")
    n, rows, seconds = 8 * p.gen_tokens, 64, max(4 * p.cell_s, 3.0)  # model-bound: HTTP is a small share
    repository = serving_repository(source, {"charlm-cb": ("charlm", {"max_running_rows": rows})})
    reqs = requests_for("charlm-cb", prompts("charlm"), "greedy", n)
    table = Table(["offered", "round", "requests offered", "goodput tokens/s", "capacity tokens/s (paired)",
                   "goodput / capacity", "admitted p50 ms", "admitted p99 ms", "capacity p99 ms (paired)",
                   "p99 / capacity p99", "shed (429)", "other errors"])
    rounds: dict[int, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    with ServerProcess("deepserve", repository=repository, device=p.device) as server:
        def capacity() -> dict[str, Any]:
            return measure(server.port, reqs, rows, p, count_tokens=token_counter(n), duration_s=seconds,
                           warmup=rows).row()

        for f in OVERLOAD_FACTORS:
            caps: list[dict[str, Any]] = []
            rounds[f] = paired(lambda: (caps.append(capacity()) or caps[-1]),
                               lambda: _overload_cell(server.port, reqs, f * caps[-1]["rps"], seconds, n),
                               p.paired_rounds if f == 4 else 1)
    engine = [asyncio.run(_engine_overload(source / "charlm" / "1", n, rows, seconds, 4.0))
              for _ in range(p.paired_rounds)]
    ratios = {}
    for f, pairs in rounds.items():
        for i, (cap, c) in enumerate(pairs):
            others = {k: v for k, v in c["errors"].items() if k != "429"}
            table.add(f"{f}x open loop", i + 1, c["offered"], c["tokens_per_s"], cap["tokens_per_s"],
                      c["tokens_per_s"] / cap["tokens_per_s"], c["p50_ms"], c["p99_ms"], cap["p99_ms"],
                      (c["p99_ms"] or float("inf")) / cap["p99_ms"], f"{100 * c['shed']:.0f} %", others or "—")
        ratios[f] = (paired_ratio([(c["tokens_per_s"], cap["tokens_per_s"]) for cap, c in pairs]),
                     paired_ratio([(c["p99_ms"] or float("inf"), cap["p99_ms"]) for cap, c in pairs]))
    section.blocks.append(f"Every request generates {n} tokens (greedy, min_new_tokens = max_new_tokens), "
                          f"max_running_rows {rows}, default 30 s deadline, {seconds:.0f} s per cell; the load "
                          "generator shares the 2 cores with the server. The offered rate is a multiple of the "
                          "request rate of the capacity cell measured just before it; ratios are judged per round "
                          "(median over rounds), since this shared VM's speed drifts between cells.")
    section.blocks.append(table)
    in_process = Table(["4x in process, round", "goodput tokens/s", "capacity tokens/s (paired)", "goodput / capacity",
                        "admitted p99 ms", "capacity p99 ms", "p99 / capacity p99", "shed (429)", "failed"])
    for i, e in enumerate(engine):
        cap, off = e["capacity"], e["offered"]
        in_process.add(i + 1, off["tokens_per_s"], cap["tokens_per_s"], off["tokens_per_s"] / cap["tokens_per_s"],
                       off["p99_ms"], cap["p99_ms"], off["p99_ms"] / cap["p99_ms"], f"{100 * off['shed']:.0f} %",
                       off["failed"])
    section.blocks.append("The same at 4x with the engine in process (no HTTP, no load generator process): what the "
                          "admission policy itself keeps when the cores are not also serving HTTP.")
    section.blocks.append(in_process)
    good, p99 = ratios[4]
    report.target("char-LM at 4x offered load: goodput / capacity tokens/s (paired)", ">= 0.80", good,
                  None if good is None else good >= 0.8)
    report.target("char-LM at 4x offered load: admitted p99 / capacity p99 (paired)", "<= 3", p99,
                  None if p99 is None else p99 <= 3)
    report.data["overload"] = {**{f"{f}x": [{"capacity": cap, "offered": c} for cap, c in pairs]
                                  for f, pairs in rounds.items()}, "4x in process": engine}
    return report.data["overload"]
