"""LeNet-style convolutional classifier: [Conv -> BatchNorm -> ReLU -> MaxPool] per stage, then an MLP head.

Convolutions use "same" padding, so each stage halves the image (floor); the flattened feature map feeds
``hidden`` fully connected layers and the final Linear producing the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from deepserve.train.config import check
from deepserve.train.models.image_input import ImageClassifierArgs


@dataclass
class CNNArgs(ImageClassifierArgs):
    """Architecture of a ``CNN``; stored as the checkpoint's model args."""

    channels: list[int] = field(default_factory=lambda: [32, 64])
    """Output channels of each conv stage; each stage is followed by 2x2 max pooling."""
    kernel_size: int = 3
    """Odd convolution kernel size (same padding)."""
    hidden: list[int] = field(default_factory=lambda: [128])
    """Widths of the fully connected layers between the conv stages and the logits."""
    dropout: float = 0.1
    """Dropout before each fully connected layer."""
    batch_norm: bool = True
    """BatchNorm after each convolution and hidden Linear."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels",
              "must be a non-empty list of widths >= 1", self.channels)
        check(self.image_size >> len(self.channels) >= 1, "channels",
              f"has {len(self.channels)} pooling stages, too many for {self.image_size}x{self.image_size} images",
              self.channels)
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "must be odd and >= 1", self.kernel_size)
        check(all(h >= 1 for h in self.hidden), "hidden", "must hold widths >= 1", self.hidden)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)


class CNN(nn.Module):
    def __init__(self, args: CNNArgs) -> None:
        super().__init__()
        self.args = args
        stages: list[nn.Module] = []
        width = args.in_channels
        for c in args.channels:
            stages += [nn.Conv2d(width, c, args.kernel_size, padding=args.kernel_size // 2, bias=not args.batch_norm)]
            stages += [nn.BatchNorm2d(c)] if args.batch_norm else []
            stages += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*stages)
        side = args.image_size >> len(args.channels)  # spatial size after the poolings
        head: list[nn.Module] = [nn.Flatten()]
        features = width * side * side
        for h in args.hidden:
            head += [nn.Dropout(args.dropout), nn.Linear(features, h, bias=not args.batch_norm)]
            head += [nn.BatchNorm1d(h)] if args.batch_norm else []
            head += [nn.ReLU(inplace=True)]
            features = h
        head += [nn.Dropout(args.dropout), nn.Linear(features, args.num_classes)]
        self.head = nn.Sequential(*head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (B, C_in, H, W) -> (B, C_last, H / 2^S, W / 2^S)
        return self.head(x)  # (B, K)
