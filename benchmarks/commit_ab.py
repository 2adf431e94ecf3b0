"""Served char-LM streaming throughput of several commits, measured back to back.

Each commit is unpacked (``git archive``) into a temporary folder and served from there by its own server process,
all on one exported char-LM; then rounds of one cell per commit (32 concurrent greedy streams of 32 tokens, 128
requests, the tail scenario's generation cell) run in rotating order, so every commit sees the same machine. The
load generator and the artifact are this checkout's; only the served code differs.

    python -m benchmarks.commit_ab 7138d01 9e8dd6a^ 9e8dd6a 676f516 HEAD --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks import servers
from benchmarks.generation import prompts, requests_for
from benchmarks.models import prepare
from benchmarks.tail import GEN_CONCURRENCY, run_cell

SUBPACKAGES = ("train", "export", "serve", "clients")
"""Top-level folders that install as ``deepserve.<name>`` (pyproject's package-dir)."""


def unpack(repo: Path, commit: str, into: Path) -> Path:
    """``commit``'s tree (of the git checkout ``repo``) in ``into``, importable as ``deepserve`` from there (the package-dir mapping as links)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=repo, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in SUBPACKAGES:
        (into / "deepserve" / name).symlink_to(Path("..") / name)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--rounds", type=int, default=3, help="rounds after the first burst of each server")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="commit-ab-"))
    prepare(work / "repository", work / "checkpoints", ["charlm"])
    reqs = requests_for("charlm", prompts("charlm"), "greedy-stream", 32)
    procs = {}
    try:
        for i, commit in enumerate(args.commits):
            tree = unpack(servers.ROOT, commit, work / f"tree{i}")
            procs[commit] = servers.ServerProcess("deepserve", repository=work / "repository", device="cpu",
                                                  root=tree).start()
        for r in range(args.rounds + 1):
            order = args.commits[r % len(args.commits):] + args.commits[: r % len(args.commits)]
            for commit in order if r % 2 == 0 else order[::-1]:
                res = run_cell(procs[commit].port, reqs, GEN_CONCURRENCY, 4 * GEN_CONCURRENCY, stream=True,
                               on_response=lambda response: len(response.event_times))
                load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
                print(f"round {r} {commit}: {res.tokens_per_s:.0f} tokens/s, errors {sum(res.errors.values())}, "
                      f"load {load}", flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
