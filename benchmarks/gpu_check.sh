#!/usr/bin/env bash
# GPU check, on a CUDA machine: the tests that have a CUDA variant (tests/test_cuda.py), then scenarios 1-2
# (classification + echo ceiling), 3 (generation, and the seq2seq engine in process) and 4 (model level) with
# --device cuda, written as a results file under $OUT (when set) or benchmarks/results. Within ~8 minutes.
#
# The machine may have torch (CUDA) but not the serving stack: wheels carried in .whl/ are installed into
# /tmp/site. On the lent H100/H200 image (torch, numpy, onnx, onnxruntime CPU, httpx, sentencepiece, pillow,
# prometheus-client, pytest there) carry: fastapi starlette uvicorn pydantic pydantic-core annotated-types
# typing-inspection typing-extensions annotated-doc opentelemetry-api python-multipart orjson (cp312 wheels,
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl`).
# Run it from the repository root (the device tool's working copy) or any checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
# The device tool returns at most 8 files from $OUT: there, everything is written to a scratch folder and
# $OUT gets the results file, the logs and one tarball holding the rest (JSON, plots).
RESULTS=${OUT:+/tmp/gpu-results}
RESULTS=${RESULTS:-$REPO/benchmarks/results}
mkdir -p "$RESULTS"

SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && SITE=/tmp/site
fi
# Without an install, deepserve.serve etc. are made importable the way pyproject's package-dir maps them, by
# links inside deepserve/ removed on exit. (A separate folder on PYTHONPATH is not enough: `python -m` puts
# the repository first on sys.path, and its deepserve/ would shadow that folder's.)
export PYTHONPATH="${SITE:+$SITE:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
LINKS=()
if ! "$PY" -c "import deepserve.serve.app" 2>/dev/null; then
  for pkg in train export serve clients; do
    if [ ! -e "deepserve/$pkg" ]; then ln -s "../$pkg" "deepserve/$pkg" && LINKS+=("deepserve/$pkg"); fi
  done
fi
trap 'rm -f "${LINKS[@]}"' EXIT
export PATH="${SITE:+$SITE/bin:}$PATH"

{
  echo "== environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  "$PY" - <<'PYEOF'
import importlib
for m in ("torch", "numpy", "onnx", "onnxruntime", "fastapi", "uvicorn", "starlette", "pydantic", "httpx",
          "sentencepiece", "matplotlib", "yaml", "prometheus_client", "multipart", "PIL", "pytest", "deepserve.serve.app"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"{m}: MISSING ({type(e).__name__}: {e})")
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
} 2>&1 | tee "$RESULTS/gpu-environment.txt"

status=0
echo "== tests with a CUDA variant (tests/test_cuda.py, marker cuda)"
SECONDS=0
timeout "${TEST_TIMEOUT_S:-150}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 \
  | tail -40 | tee "$RESULTS/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "tests took ${SECONDS} s"

echo "== scenarios 1-4 on CUDA (quick plan)"
SECONDS=0
timeout "${BENCH_TIMEOUT_S:-330}" "$PY" -m benchmarks.run --device cuda --quick --only classification \
  --only generation --only engine --only model --no-profile --out "$RESULTS" --name "$(date +%Y-%m-%d)-gpu" \
  2>&1 | tee "$RESULTS/gpu-bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "benchmarks took ${SECONDS} s; exit status $status"
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/*.md "$RESULTS"/*.log "$RESULTS"/gpu-environment.txt "$OUT"/ 2>/dev/null
  tar czf "$OUT/gpu-results.tgz" -C "$RESULTS" .
fi
exit $status
