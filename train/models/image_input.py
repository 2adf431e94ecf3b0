"""What every image classifier's args share: the input images they take and the logits they produce."""

from __future__ import annotations

from dataclasses import dataclass

from deepserve.train.config import check


@dataclass
class ImageClassifierArgs:
    """Base of ``MLPArgs``, ``CNNArgs`` and ``ResNetArgs`` (its fields come first in their checkpoints)."""

    in_channels: int = 1
    """Channels of the input images (1 grayscale, 3 RGB)."""
    image_size: int = 8
    """Height and width of the (square) input images."""
    num_classes: int = 10
    """Number of output logits."""

    def __post_init__(self) -> None:
        check(self.in_channels >= 1, "in_channels", "must be >= 1", self.in_channels)
        check(self.image_size >= 1, "image_size", "must be >= 1", self.image_size)
        check(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
