# syntax=docker/dockerfile:1
# deepserve serving images.
#   GPU (default): docker build -t deepserve .
#   CPU:           docker build --build-arg DEVICE=cpu -t deepserve:cpu .
#   slim (CPU, ONNX artifacts only, no torch): docker build --target slim -t deepserve:slim .
# The GPU image needs an NVIDIA driver that supports CUDA 13.0 (>= 580) and the NVIDIA Container Toolkit; for an
# older driver pass e.g. --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# --build-arg CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128 (and an onnxruntime-gpu built for CUDA 12).
ARG DEVICE=cuda
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV TORCH_INDEX=${CUDA_TORCH_INDEX}

FROM ${CPU_IMAGE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# The slim image's environment: deepserve[serve] has no torch. The CPU onnxruntime wheel (same version) replaces
# onnxruntime-gpu: 69 MB instead of 354 MB installed, no consistent speed difference on CPU (benchmarks/ort_wheels.py).
FROM ${CPU_IMAGE} AS slim-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deepserve/ deepserve/
COPY train/ train/
COPY export/ export/
COPY serve/ serve/
COPY clients/ clients/
# DL3013: this installs the project itself; its dependencies carry their bounds in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir ".[serve]" \
    && ort="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
    && pip uninstall -y onnxruntime-gpu \
    && pip install --no-cache-dir "onnxruntime==${ort}" \
    && pip uninstall -y pip setuptools wheel \
    && python -c "import onnxruntime, deepserve.serve.app, importlib.util; assert importlib.util.find_spec('torch') is None"

# Only the environment is copied: no compiler, pip or build files in the image.
FROM ${CPU_IMAGE} AS slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin deepserve \
    && mkdir -p /models \
    && chown deepserve:deepserve /models
COPY --from=slim-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/deepserve
VOLUME ["/models"]
EXPOSE 8000
# The full image's health check: 503 until every model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["deepserve", "serve"]
CMD ["--repository", "/models", "--host", "0.0.0.0", "--port", "8000"]

# DL3006: a stage of this file, not an image to pull.
# hadolint ignore=DL3006
FROM base-${DEVICE}
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch first and from its own index (CUDA or CPU build), so that installing deepserve keeps it.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deepserve/ deepserve/
COPY train/ train/
COPY export/ export/
COPY serve/ serve/
COPY clients/ clients/
# onnxruntime-gpu (a core dependency) runs CUDA on the GPU image and falls back to its CPU provider otherwise;
# serve-torchscript keeps the torch installed above, for TorchScript artifacts.
# DL3013: this installs the project itself; its dependencies carry their bounds in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve-torchscript]" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin deepserve \
    && mkdir -p /models \
    && chown deepserve:deepserve /models

USER 10001:10001
WORKDIR /home/deepserve
VOLUME ["/models"]
EXPOSE 8000

# 503 until every model is loaded and warmed up; urlopen raises on any status >= 400.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]

ENTRYPOINT ["deepserve", "serve"]
CMD ["--repository", "/models", "--host", "0.0.0.0", "--port", "8000"]
