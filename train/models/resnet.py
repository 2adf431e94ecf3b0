"""ResNet for small images (CIFAR style): a 3x3 stem without max pooling, stages of basic residual blocks
(two 3x3 convolutions with BatchNorm), stride 2 at the start of every stage after the first, global average
pooling and a Linear head. ``blocks=[2, 2, 2, 2]``, ``widths=[64, 128, 256, 512]`` is ResNet-18."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepserve.train.config import check
from deepserve.train.models.image_input import ImageClassifierArgs


@dataclass
class ResNetArgs(ImageClassifierArgs):
    """Architecture of a ``ResNet``; stored as the checkpoint's model args."""

    in_channels: int = 3
    """Channels of the input images (CIFAR-style RGB by default)."""
    image_size: int = 32
    """Height and width of the (square) input images."""
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    """Residual blocks per stage."""
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Channels of each stage (same length as ``blocks``); the stem has ``widths[0]``."""
    dropout: float = 0.0
    """Dropout before the final Linear."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.blocks) >= 1 and all(b >= 1 for b in self.blocks), "blocks",
              "must be a non-empty list of counts >= 1", self.blocks)
        check(len(self.widths) == len(self.blocks), "widths", f"must have {len(self.blocks)} entries like blocks",
              self.widths)
        check(all(w >= 1 for w in self.widths), "widths", "must hold widths >= 1", self.widths)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the (projected when the shape changes) input, -> ReLU."""

    def __init__(self, in_width: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_width != width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, W, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, args: ResNetArgs) -> None:
        super().__init__()
        self.args = args
        self.stem = nn.Sequential(
            nn.Conv2d(args.in_channels, args.widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(args.widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_width = args.widths[0]
        for stage, (count, width) in enumerate(zip(args.blocks, args.widths)):
            for i in range(count):
                layers.append(BasicBlock(in_width, width, stride=2 if stage > 0 and i == 0 else 1))
                in_width = width
        self.layers = nn.Sequential(*layers)
        side = args.image_size
        for _ in args.blocks[1:]:
            side = (side + 1) // 2  # a stride-2 conv with padding 1 rounds up
        # a fixed-size average pool exports as ONNX AveragePool at any opset (mean over dims needs opset 18)
        self.pool = nn.AvgPool2d(side)
        self.dropout = nn.Dropout(args.dropout)
        self.fc = nn.Linear(in_width, args.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity: trains faster and more stably

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, W0, H, W)
        x = self.layers(x)  # (B, W_last, H / 2^(S-1), W / 2^(S-1))
        x = self.pool(x).flatten(1)  # global average pool -> (B, W_last)
        return self.fc(self.dropout(x))  # (B, K)
