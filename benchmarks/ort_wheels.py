"""Does the CPU ``onnxruntime`` wheel run as fast as ``onnxruntime-gpu``'s CPU provider? (for the slim image)

    python -m benchmarks.ort_wheels --python A/bin/python --python B/bin/python --repository DIR [--rounds 5]

Each interpreter times ``session.run`` on the benchmark models' ONNX graphs with the server's session options,
in alternating rounds (the two wheels back to back, so both see the same shared machine); prints ms per call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = int(sys.argv[2]), 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
out = {"wheel": [d.metadata["Name"] for d in __import__("importlib.metadata").metadata.distributions()
                 if d.metadata["Name"].startswith("onnxruntime")][0]}
for spec in json.loads(sys.argv[1]):
    s = ort.InferenceSession(spec["file"], sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal([spec["batch"], *spec["shape"]]).astype(np.float32)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(5):
        s.run(None, feed)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        s.run(None, feed)
        n += 1
    out[f"{spec['name']} b{spec['batch']}"] = 1000 * (time.perf_counter() - start) / n
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ort_wheels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", required=True, help="an interpreter with one ORT wheel")
    parser.add_argument("--repository", type=Path, required=True, help="benchmark repository (digits-cnn, resnet18)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    specs = [{"name": name, "file": str(args.repository / name / "1" / "model.onnx"), "shape": shape, "batch": b}
             for name, shape in (("digits-cnn", [1, 8, 8]), ("resnet18", [3, 32, 32])) for b in (1, 32)]
    rows: dict[str, list[dict]] = {p: [] for p in args.python}
    for i in range(args.rounds):
        for python in args.python if i % 2 == 0 else reversed(args.python):
            done = subprocess.run([python, "-c", CHILD, json.dumps(specs), str(args.threads)],
                                  capture_output=True, text=True, check=True)
            rows[python].append(json.loads(done.stdout))
    keys = [k for k in rows[args.python[0]][0] if k != "wheel"]
    print("| wheel | " + " | ".join(f"{k} ms (median of {args.rounds})" for k in keys) + " |")
    print("|---|" + "--:|" * len(keys))
    for python, runs in rows.items():
        medians = [sorted(r[k] for r in runs)[len(runs) // 2] for k in keys]
        print(f"| {runs[0]['wheel']} | " + " | ".join(f"{m:.3f}" for m in medians) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
