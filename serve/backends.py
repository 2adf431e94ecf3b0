"""Opening exported graphs: device resolution, backend choice and session creation.

Shared by the classification runtime and the generation engines so that every graph is opened the same
way: ONNX Runtime (CUDA execution provider when a GPU is really present, else CPU with sane thread counts)
or TorchScript (CUDA, else CPU).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Backend = Literal["onnx", "torchscript"]
DeviceName = Literal["cpu", "cuda"]


class BackendUnavailable(RuntimeError):
    """The requested backend/device/variant cannot be used for this artifact."""


@functools.cache
def cuda_device_count() -> int:
    """CUDA GPUs the driver offers this process (honours ``CUDA_VISIBLE_DEVICES``); 0 without a driver.

    Asked of the driver library itself (``cuInit`` + ``cuDeviceGetCount``, what CUDA runtimes call first), not
    of torch: resolving ``--device auto`` must not import torch where every model runs on ONNX Runtime."""
    try:
        driver = ctypes.CDLL("libcuda.so.1" if os.name == "posix" else "nvcuda.dll")
    except OSError:  # no NVIDIA driver installed
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0  # a driver without a usable GPU (or too old for it)
    return count.value


def cuda_available() -> bool:
    return cuda_device_count() > 0


def resolve_device(device: str) -> DeviceName:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise BackendUnavailable("device cuda was requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise BackendUnavailable(f"device must be auto, cpu or cuda, got {device!r}")
    return device  # type: ignore[return-value]


def cpu_threads(instances: int = 1) -> int:
    """Intra-op threads per model instance: the cores this process may use, shared between instances."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, instances))


@dataclass(frozen=True)
class GraphChoice:
    backend: Backend
    variant: str
    """Key of the manifest graph's ``files``: torchscript | onnx | onnx-int8 | onnx-fp16."""
    file: Path


def choose_graph(
    files: dict[str, str], directory: Path, *, backend: str, device: DeviceName, precision: str = "fp32"
) -> GraphChoice:
    """Pick the graph file for a backend preference (``auto|onnx|torchscript``), device and precision
    (``fp32|int8|fp16``). ``auto`` prefers ONNX Runtime on CPU and TorchScript on CUDA."""
    if backend == "auto":
        order: list[Backend] = ["torchscript", "onnx"] if device == "cuda" else ["onnx", "torchscript"]
    elif backend in ("onnx", "torchscript"):
        order = [backend]  # type: ignore[list-item]
    else:
        raise BackendUnavailable(f"backend must be auto, onnx or torchscript, got {backend!r}")
    for candidate in order:
        if candidate == "torchscript":
            variant = "torchscript"
        else:
            variant = {"fp32": "onnx", "int8": "onnx-int8", "fp16": "onnx-fp16"}.get(precision, "onnx")
        if variant in files:
            return GraphChoice(candidate, variant, Path(directory) / files[variant])
    raise BackendUnavailable(f"no graph file for backend {backend!r} precision {precision!r}; have {sorted(files)}")


def onnx_session(path: Path, device: DeviceName, *, threads: int | None = None):  # -> ort.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if device == "cpu":
        # Spinning intra-op workers compete with the event loop on small machines: on 2 cores it doubled
        # the server's CPU per request for small models.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider in this installation")
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendUnavailable("onnxruntime could not start its CUDA provider (are the CUDA 13 libraries installed?)")
    return session


def import_torch():  # -> the torch module
    """torch, which only TorchScript graphs need; where it is not installed, a reason that says what to do."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise BackendUnavailable("the TorchScript backend needs torch, which is not installed: "
                                 "pip install 'deepserve[serve-torchscript]', or serve the ONNX graphs") from None
    return torch


def torchscript_module(path: Path, device: DeviceName, *, threads: int | None = None):  # -> torch.jit.ScriptModule
    torch = import_torch()
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return module
