"""Multi-layer perceptron image classifier: flatten -> [Linear -> BatchNorm -> ReLU -> Dropout] x N -> Linear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from deepserve.train.config import check
from deepserve.train.models.image_input import ImageClassifierArgs


@dataclass
class MLPArgs(ImageClassifierArgs):
    """Architecture of an ``MLP``; stored as the checkpoint's model args."""

    hidden: list[int] = field(default_factory=lambda: [256, 128])
    """Width of each hidden layer (may be empty: a linear classifier)."""
    dropout: float = 0.1
    """Dropout after each hidden layer."""
    batch_norm: bool = True
    """BatchNorm after each hidden Linear."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(all(h >= 1 for h in self.hidden), "hidden", "must hold widths >= 1", self.hidden)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)


class MLP(nn.Module):
    def __init__(self, args: MLPArgs) -> None:
        super().__init__()
        self.args = args
        layers: list[nn.Module] = [nn.Flatten()]
        width = args.in_channels * args.image_size * args.image_size
        for h in args.hidden:
            layers += [nn.Linear(width, h, bias=not args.batch_norm)]
            layers += [nn.BatchNorm1d(h)] if args.batch_norm else []
            layers += [nn.ReLU(inplace=True), nn.Dropout(args.dropout)]
            width = h
        layers.append(nn.Linear(width, args.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, C, H, W) -> (B, K)
