"""Multi-layer perceptron image classifier: flatten -> [Linear -> BatchNorm -> ReLU -> Dropout] x N -> Linear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from deepserve.train.config import check


@dataclass
class MLPArgs:
    """Architecture of an ``MLP``; stored as the checkpoint's model args."""

    in_channels: int = 1
    """Channels of the input images (1 grayscale, 3 RGB)."""
    image_size: int = 8
    """Height and width of the (square) input images."""
    num_classes: int = 10
    """Number of output logits."""
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    """Width of each hidden layer (may be empty: a linear classifier)."""
    dropout: float = 0.1
    """Dropout after each hidden layer."""
    batch_norm: bool = True
    """BatchNorm after each hidden Linear."""

    def __post_init__(self) -> None:
        check(self.in_channels >= 1, "in_channels", "must be >= 1", self.in_channels)
        check(self.image_size >= 1, "image_size", "must be >= 1", self.image_size)
        check(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
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
