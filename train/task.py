"""The small interface between the generic training loop (``loop.py``) and each model family.

A family provides a run-config dataclass (with ``train: TrainConfig`` plus its own ``data`` and ``model``
sections) and a ``Task`` subclass. The loop owns the optimizer, schedule, clipping, AMP, early stopping,
checkpoints, progress bar, TensorBoard and curves; the task owns data, model, loss and metrics.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn


class Task(ABC):
    """One model family's training logic."""

    task: ClassVar[str]
    """Checkpoint / manifest task name: image-classification | char-lm | seq2seq."""
    monitor: ClassVar[str] = "val_loss"
    """Metric from ``evaluate`` used for early stopping and best-checkpoint selection."""
    monitor_mode: ClassVar[str] = "min"
    """``min`` or ``max``."""

    def __init__(self, config: Any, device: torch.device, out_dir: Path) -> None:
        self.config = config
        self.device = device
        self.out_dir = out_dir
        self.model: nn.Module
        self.model_type: str
        self.model_args: Any  # the model's Args dataclass

    @abstractmethod
    def setup(self) -> None:
        """Load data and build ``self.model`` (on ``self.device``), ``self.model_type``, ``self.model_args``."""

    @abstractmethod
    def train_batches(self, epoch: int) -> Iterator[Any]:
        """Yield one epoch of training batches (the loop moves nothing; put tensors on ``self.device``)."""

    def steps_per_epoch(self) -> int | None:
        """Number of batches per epoch, for the progress bar and the LR schedule; None if unknown."""
        return None

    @abstractmethod
    def training_loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """Forward one batch in train mode; return (scalar loss, number of items for throughput)."""

    @abstractmethod
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics, including ``self.monitor``. The loop sets eval mode around the call."""

    def on_evaluate(self, metrics: dict[str, float], log: Any) -> None:
        """Hook after each evaluation (for example print a generated sample via ``log(str)``)."""

    @torch.no_grad()
    def final_report(self) -> dict[str, float]:
        """Test-set metrics of the best model, computed once at the end; may write files to ``out_dir``."""
        return {}

    @abstractmethod
    def checkpoint_data(self) -> dict[str, Any]:
        """Task data stored with the checkpoint (labels, normalisation, vocab, tokenizer bytes...)."""


# family name (CLI) -> (module, run-config class, task class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "classifier": ("deepserve.train.classification", "ClassifierRunConfig", "ClassificationTask"),
    "charlm": ("deepserve.train.charlm", "CharLMRunConfig", "CharLMTask"),
    "seq2seq": ("deepserve.train.seq2seq", "Seq2SeqRunConfig", "Seq2SeqTask"),
}


def family_classes(family: str) -> tuple[type, type[Task]]:
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    module_name, config_name, task_name = FAMILIES[family]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, task_name)
