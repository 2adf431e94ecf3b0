"""Checkpoints are data: ``state_dict`` + model args + config + task data + metrics, never a pickled module.

Written atomically (temporary file, fsync, rename) and loaded with ``torch.load(weights_only=True)``.
The layout is documented in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "deepserve.checkpoint"
FORMAT_VERSION = 1
TASKS = ("image-classification", "char-lm", "seq2seq")
_REQUIRED = ("task", "model", "state_dict", "config", "data")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match what is expected of it."""


def save_checkpoint(
    path: str | Path,
    *,
    task: str,
    model_type: str,
    model_args: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, float] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    if task not in TASKS:
        raise CheckpointError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "model": {"type": model_type, "args": dict(model_args)},
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "config": config,
        "data": data,
        "metrics": dict(metrics or {}),
        "train_state": train_state,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, *, expected_task: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is a ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt/unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a deepserve checkpoint): {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a deepserve checkpoint (no format marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {payload.get('format_version')!r}; this deepserve reads {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {missing}")
    if expected_task is not None and payload["task"] != expected_task:
        raise CheckpointError(f"checkpoint {path} holds a {payload['task']!r} model, expected {expected_task!r}")
    return payload


def restore_model(payload: dict[str, Any], path: str | Path = "<checkpoint>") -> torch.nn.Module:
    """Rebuild the eager model from a loaded checkpoint (architecture from its args, then the weights)."""
    from deepserve.train.models import build_model

    model_type, args = payload["model"]["type"], payload["model"]["args"]
    try:
        model = build_model(model_type, args)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot build model {model_type!r} from its args: {e}") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not match model {model_type!r}: {e}") from None
    return model.eval()
