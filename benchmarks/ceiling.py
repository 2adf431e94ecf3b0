"""Scenario 3e: char-LM continuous batching at concurrency 32 against the engine's own step ceiling at batch 32.

Both in process, in the same run, rounds alternating (ABBA) so that both sides of each ratio see the same machine.
Ceiling: the step model the engine opens (same backend and threads) holding 32 rows, one ``step`` call and a greedy
argmax per token and nothing else: what the engine would reach if admission, prefill, selection and events were
free. Beside it the same model work without the engine: 32 prompts joined (prefilled) then N steps, repeated. Continuous batching: ``GenerationServable`` (the server's engine without HTTP) with 32 requests always in
flight (a closed loop), each exactly N greedy tokens after a 24-character prompt, on the ``prefill`` graph (prompts
and steps), and once more on the ``step`` graph alone (how artifacts exported before ``prefill`` run).
Target: continuous >= 0.90 of the ceiling.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Plan, paired_ratio
from benchmarks.generation import prompts
from benchmarks.results import Report, Table

ROWS = 32
NEW_TOKENS = 64
"""Per request, as in the seq2seq engine scenarios."""


def step_ceiling(model: Any, seconds: float, texts: list[list[int]] | None = None, n: int = 0) -> float:
    """Tokens/s of ``ROWS`` rows stepping greedily on ``model`` (a fresh ``StepModel``) for ``seconds``.

    Without ``texts``: the rows join once and only ``step`` is timed. With ``texts`` (token ids) and ``n``: the
    engine's work without the engine, ``ROWS`` prompts joined (prefilled) and ``n`` steps, again and again."""
    rng = np.random.default_rng(0)
    prompts = texts or [list(rng.integers(1, model.vocab_size, 24)) for _ in range(ROWS)]
    rows = [prompts[i % len(prompts)] for i in range(ROWS)]
    tokens = model.join(rows, [1] * ROWS)
    for _ in range(8):  # warm
        tokens = model.step(tokens).argmax(1)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if texts and done % (n * ROWS) == 0:
            model.reorder(np.zeros(0, np.int64))
            tokens = model.join(rows, [1] * ROWS)
        tokens = model.step(tokens).argmax(1)
        done += ROWS
    rate = done / (time.perf_counter() - t0)
    model.reorder(np.zeros(0, np.int64))
    return rate


async def closed_loop(servable: Any, texts: list[str], n: int, seconds: float) -> float:
    """Tokens/s of ``ROWS`` requests always in flight on ``servable`` for ``seconds``."""
    params = {"temperature": 0.0, "max_new_tokens": n, "min_new_tokens": n}
    t0 = time.perf_counter()
    end = t0 + seconds

    async def worker(i: int) -> int:
        done = 0
        while time.perf_counter() < end:
            done += (await servable.generate(texts[i % len(texts)], params)).completion_tokens
        return done

    tokens = sum(await asyncio.gather(*(worker(i) for i in range(ROWS))))
    return tokens / (time.perf_counter() - t0)


async def measure(directory: Path, n: int, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Per round: the step ceiling and continuous batching with and without the prefill graph."""
    from deepserve.manifest import load_manifest
    from deepserve.serve import backends
    from deepserve.serve.generation.engine import GenerationServable
    from deepserve.serve.generation.step_models import open_step_model
    from deepserve.serve.settings import ModelSettings

    manifest = load_manifest(directory, verify=False)
    settings = ModelSettings(max_running_rows=ROWS)

    def opened() -> Any:
        return open_step_model(manifest, directory, backend=settings.backend, device="cpu",
                               threads=backends.cpu_threads(1))

    old = load_manifest(directory, verify=False)
    old.graphs.pop("prefill")  # as exported before the prefill graph
    step_only = open_step_model(old, directory, backend=settings.backend, device="cpu", threads=backends.cpu_threads(1))
    engines = {"prefill": GenerationServable(manifest, directory, settings, "cpu"),
               "step only": GenerationServable(manifest, directory, settings, "cpu", step_model=step_only)}
    ceiling_model, texts = opened(), prompts("charlm")
    out: dict[str, list[float]] = {"ceiling": [], "ceiling + prefill": [], **{k: [] for k in engines}}
    for s in engines.values():
        await s.start()
        await s.warmup()
    ids = [list(engines["prefill"].tokenizer.encode(t)) for t in texts]
    sides = {"ceiling": lambda: step_ceiling(ceiling_model, seconds / 2),
             "ceiling + prefill": lambda: step_ceiling(ceiling_model, seconds / 2, ids, n)}
    try:
        for r in range(rounds):
            order = [*sides, *engines] if r % 2 == 0 else [*reversed(engines), *reversed(sides)]
            for side in order:
                out[side].append(sides[side]() if side in sides else await closed_loop(engines[side], texts, n, seconds))
    finally:
        for s in engines.values():
            await s.stop()
    return out


def run_scenario(report: Report, source: Path, p: Plan) -> dict[str, Any]:
    from deepserve.serve.cli import GIL_SWITCH_S

    sys.setswitchinterval(GIL_SWITCH_S)  # as `deepserve serve` runs its engines
    section = report.section("Scenario 3e — char-LM continuous batching vs the engine's step ceiling")
    section.blocks.append(__doc__.split("\n\n")[1].replace("\n", " ") + f" N = {NEW_TOKENS}.")
    runs = asyncio.run(measure(source / "charlm" / "1", NEW_TOKENS, 4 * p.cell_s, max(3, p.paired_rounds)))
    ratio = {f"{k} / {c}": paired_ratio(list(zip(runs[k], runs[c])))
             for k in ("prefill", "step only") for c in ("ceiling", "ceiling + prefill")}
    table = Table(["round", "step ceiling, batch 32", "prefill + steps, no engine", "continuous c=32", "/ step ceiling",
                   "/ prefill + steps", "continuous c=32, step graph only", "/ step ceiling"],
                  title="tokens/s, in process")
    for i, (c, w, cb, old) in enumerate(zip(runs["ceiling"], runs["ceiling + prefill"], runs["prefill"],
                                            runs["step only"])):
        table.add(i + 1, round(c), round(w), round(cb), round(cb / c, 3), round(cb / w, 3), round(old), round(old / c, 3))
    section.blocks.append(table)
    got, work = ratio["prefill / ceiling"], ratio["prefill / ceiling + prefill"]
    report.target("char-LM continuous batching at c=32 / step ceiling at batch 32 (paired median)", ">= 0.90", got,
                  None if got is None else got >= 0.90,
                  f"the prompts' prefill is work the step ceiling leaves out: / (prefill + steps, no engine) = "
                  f"{work:.3f}" if work is not None else "")
    report.data["ceiling"] = {**runs, "ratio": ratio, "new_tokens": NEW_TOKENS}
    return report.data["ceiling"]
