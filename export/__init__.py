"""Checkpoint -> versioned artifact (TorchScript, ONNX, int8 / fp16 ONNX variants) with parity checks.

``export_checkpoint`` and ``verify_artifact`` are imported lazily so that ``deepserve.export.cli`` (and with it
the ``deepserve`` command) can be imported without torch.
"""

from __future__ import annotations

from typing import Any

from deepserve.export.errors import ExportError, ParityError

__all__ = ["ExportError", "ParityError", "export_checkpoint", "verify_artifact"]


def __getattr__(name: str) -> Any:
    if name in ("export_checkpoint", "verify_artifact"):
        from deepserve.export import api

        return getattr(api, name)
    raise AttributeError(f"module 'deepserve.export' has no attribute {name!r}")
