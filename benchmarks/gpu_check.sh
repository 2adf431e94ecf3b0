#!/usr/bin/env bash
# GPU check, on a CUDA machine: the tests that have a CUDA variant, then scenarios 1-2 (classification + echo
# ceiling) and 3 (generation, and the seq2seq engine in process) with --device cuda, written as a results file
# under $OUT (when set) or benchmarks/results. Finishes within ~6 minutes.
#
# The machine may have torch (CUDA) but not the serving stack: wheels carried in .whl/ are installed into
# /tmp/site, and deepserve is put on the import path without pip-installing it, through a temporary directory
# mirroring pyproject's package-dir mapping (deepserve -> deepserve/, deepserve.train -> train/, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
RESULTS=${OUT:-$REPO/benchmarks/results}
mkdir -p "$RESULTS"

SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && SITE=/tmp/site
fi
LAYOUT=$(mktemp -d /tmp/deepserve-path.XXXXXX)
mkdir -p "$LAYOUT/deepserve"
for f in "$REPO"/deepserve/*.py; do ln -s "$f" "$LAYOUT/deepserve/"; done
for pkg in train export serve clients; do ln -s "$REPO/$pkg" "$LAYOUT/deepserve/$pkg"; done
export PYTHONPATH="${SITE:+$SITE:}$LAYOUT:$REPO${PYTHONPATH:+:$PYTHONPATH}"
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
echo "== tests with a CUDA variant"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests 2>&1 | tail -40 | tee "$RESULTS/gpu-tests.log"
  rc=${PIPESTATUS[0]}
  # 5 = no test selected: nothing has a CUDA variant yet, which is not a failure of this check
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
else
  echo "pytest is not installed here: CUDA test variants skipped" | tee "$RESULTS/gpu-tests.log"
fi

echo "== scenarios 1-3 on CUDA"
timeout 270 "$PY" -m benchmarks.run --device cuda --quick --only classification --only generation --only engine \
  --no-profile --out "$RESULTS" --name "$(date +%Y-%m-%d)-gpu" || status=1
exit $status
