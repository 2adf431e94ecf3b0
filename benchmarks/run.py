"""Run the benchmark suite and write ``<out>/<date>-<machine>.md`` (+ .json and PNG plots).

    python -m benchmarks.run --out benchmarks/results            # everything (make bench), ~13 min on 2 cores
    python -m benchmarks.run --quick                             # everything, shorter and narrower, ~2 min
    python -m benchmarks.run --only classification --only model  # some scenarios

Scenarios: classification (1 and 2: server, protocols, batching, backends, echo ceiling), generation (3: char-LM
and seq2seq through the server), engine (3b: the seq2seq engine in process), overload (3c: char-LM goodput at
1-4x capacity), peer (3d: the seq2seq engine vs CTranslate2, same weights; the bench extra), model (4: eager /
TorchScript / ONNX Runtime latency), rollout (5: request latency while a model reloads vs steady), tail (6:
p50/p99/max per repetition, collector options, first burst, mosec; the bench extra), coldstart (7: process start
to ready, first request, memory), scaleout (8: the plain server against Ray Serve with 1 and 2 replicas), ceiling
(3e: char-LM continuous batching at concurrency 32 against the engine's step ceiling at batch 32, in process). Models
have fixed random weights and are exported into a temporary repository (``--cache DIR`` keeps it between runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

SCENARIOS = ("classification", "generation", "engine", "model", "rollout", "overload", "peer", "tail", "coldstart",
             "scaleout", "ceiling")
NEEDS = {"classification": ["digits-cnn", "resnet18"], "generation": ["charlm", "seq2seq"], "engine": ["seq2seq"],
         "model": ["digits-cnn", "resnet18", "charlm", "seq2seq"], "rollout": ["digits-cnn"],
         "overload": ["charlm"], "peer": ["seq2seq"], "tail": ["digits-cnn", "resnet18", "charlm"],
         "coldstart": ["digits-cnn", "charlm", "seq2seq"], "scaleout": ["digits-cnn", "resnet18"],
         "ceiling": ["charlm"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    parser.add_argument("--quick", action="store_true", help="short cells and fewer concurrencies (~2 minutes)")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for servers and runtimes")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep checkpoints and exported artifacts here and reuse them")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the servers")
    parser.add_argument("--name", default=None, help="results file stem instead of <date>-<machine>")
    parser.add_argument("--models", action="append", default=None, metavar="MODEL",
                        help="only the cells of this model (repeatable), e.g. --only tail --models charlm")
    return parser


def _commit() -> str:
    """The commit measured (``git describe``: ``-dirty`` when the tree has changes), or ``unknown``."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def run_one(scenario: str, report, repository: Path, checkpoints: Path, p, *, profile: bool,
            models: list[str] | None = None) -> None:
    """Run one scenario into ``report`` (the cells of ``models`` only, if given); each module is imported only when
    its scenario is chosen."""
    needs = [n for n in NEEDS[scenario] if not models or n in models]
    if scenario == "classification":
        from benchmarks.classification import run_scenario

        run_scenario(report, repository, p, needs, profile=profile)
        return
    calls = {
        "generation": ("benchmarks.generation", "run_scenario", (report, repository, p, needs)),
        "tail": ("benchmarks.tail", "run_scenario", (report, repository, p, needs)),
        "coldstart": ("benchmarks.coldstart", "run_scenario", (report, repository, p)),
        "engine": ("benchmarks.generation", "run_engine", (report, repository, p)),
        "rollout": ("benchmarks.rollout", "run_scenario", (report, repository, p)),
        "overload": ("benchmarks.generation", "run_overload", (report, repository, p)),
        "peer": ("benchmarks.ct2_peer", "run_scenario", (report, repository, checkpoints, p)),
        "scaleout": ("benchmarks.scaleout", "run_scenario", (report, repository, p, needs)),
        "ceiling": ("benchmarks.ceiling", "run_scenario", (report, repository, p)),
    }
    module, function, call_args = calls.get(
        scenario, ("benchmarks.modellevel", "run_scenario", (report, repository, checkpoints, p, needs)))
    getattr(importlib.import_module(module), function)(*call_args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.common import plan
    from benchmarks.results import Report

    chosen = [s for s in SCENARIOS if not args.only or s in args.only]
    p = plan(args.quick, args.device)
    if args.device == "cuda":
        from benchmarks.results import gpu_name

        if gpu_name() is None:
            print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
            return 2
    report = Report("deepserve benchmarks", settings={**p.settings(), "scenarios": ",".join(chosen),
                                                      "commit": _commit()})
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    cache = args.cache or work
    repository, checkpoints = cache / "repository", cache / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from benchmarks import models

    names = sorted({n for s in chosen for n in NEEDS[s] if not args.models or n in args.models},
                   key=list(models.MODELS).index)
    notes = models.prepare(repository, checkpoints, names, log=lambda m: print(m, flush=True))
    section = report.section("Models")
    section.blocks.append("\n".join(f"- `{n}`: {models.MODELS[n].describe}" + (f" — {notes[n]}" if n in notes else "")
                                    for n in names))
    print(f"[bench] models ready in {time.perf_counter() - started:.0f} s", flush=True)
    failures = []
    for scenario in chosen:
        t0 = time.perf_counter()
        print(f"[bench] scenario {scenario} ...", flush=True)
        try:
            run_one(scenario, report, repository, checkpoints, p, profile=not args.no_profile, models=args.models)
        except (ImportError, RuntimeError, OSError, ValueError, KeyError) as e:  # keep the other scenarios' numbers
            failures.append(scenario)
            report.section(f"Scenario {scenario} — failed").blocks.append(f"`{type(e).__name__}: {e}`")
            print(f"[bench] scenario {scenario} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(f"[bench] scenario {scenario} took {time.perf_counter() - t0:.0f} s", flush=True)
    report.settings["total_s"] = round(time.perf_counter() - started)
    path = report.write(args.out, args.name)
    print(f"[bench] wrote {path} in {time.perf_counter() - started:.0f} s")
    for t in report.targets:
        state = "n/a" if t.met is None else "met" if t.met else "MISSED"
        print(f"  [{state}] {t.name}: {t.measured if t.measured is None else round(t.measured, 3)} ({t.target})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
