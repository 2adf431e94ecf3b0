"""Image-classification data held fully in memory as tensors: loading, deterministic splits, normalisation
statistics and batch preprocessing (augmentation as batched tensor ops, on whatever device the data lives on).

The datasets are small enough (CIFAR-10 is 150 MB of uint8) that per-sample DataLoader overhead would dominate;
indexing a resident uint8 tensor with a shuffled index is both faster and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from deepserve.train.config import check
from deepserve.train.data.download import DataError, default_data_root
from deepserve.train.data.image_formats import IDX_SOURCES, RawImages, load_cifar10, load_idx_dataset, load_image_folder

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")


@dataclass
class ImageDataConfig:
    """Which image dataset to train on and how to split, augment and batch it."""

    dataset: Literal["digits", "mnist", "fashion-mnist", "cifar10", "imagefolder"] = "digits"
    """digits (scikit-learn 8x8, offline), mnist, fashion-mnist (IDX files), cifar10 (python batches),
    imagefolder (one sub-folder of PNG/JPEG images per class)."""
    data_dir: str = ""
    """Folder holding (or receiving) the dataset files; empty: ``$DEEPSERVE_DATA/<dataset>``
    (default ``~/.cache/deepserve/datasets/<dataset>``). Required for imagefolder."""
    download: bool = True
    """Download missing files (SHA-256 checked) into ``data_dir``; off or offline, a missing file is an error."""
    val_fraction: float = 0.1
    """Fraction of the training split held out for validation (early stopping, best checkpoint)."""
    test_fraction: float = 0.2
    """Fraction held out for testing when the dataset has no official test split (digits, imagefolder)."""
    split_seed: int = 0
    """Seed of the train/val/test carving; fixed splits make runs comparable."""
    image_size: int = 32
    """imagefolder only: images are resized to image_size x image_size."""
    grayscale: bool = False
    """imagefolder only: convert images to one channel instead of RGB."""
    augment: bool = False
    """Random crop (zero padding of ``crop_padding`` pixels) and horizontal flip (if ``hflip``) while training."""
    crop_padding: int = 4
    """Padding of the random crop, in pixels (0: no crop)."""
    hflip: bool = True
    """Random horizontal flips when ``augment`` is on (turn off for digits and text-like images)."""
    max_train_examples: int = 0
    """Use at most this many training examples, a fixed random subset (0: all); for quick runs."""
    eval_batch_size: int = 512
    """Batch size for validation and test passes."""

    def __post_init__(self) -> None:
        check(self.dataset in DATASETS, "dataset", f"must be one of {list(DATASETS)}", self.dataset)
        check(self.dataset != "imagefolder" or bool(self.data_dir), "data_dir", "is required for imagefolder",
              self.data_dir)
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)", self.val_fraction)
        check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)", self.test_fraction)
        check(self.val_fraction + self.test_fraction < 1, "val_fraction", "plus test_fraction must be < 1",
              self.val_fraction)
        check(self.split_seed >= 0, "split_seed", "must be >= 0", self.split_seed)
        check(4 <= self.image_size <= 1024, "image_size", "must be in [4, 1024]", self.image_size)
        check(self.crop_padding >= 0, "crop_padding", "must be >= 0", self.crop_padding)
        check(self.max_train_examples >= 0, "max_train_examples", "must be >= 0", self.max_train_examples)
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1", self.eval_batch_size)

    def resolved_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_root() / self.dataset


@dataclass
class ImageSplit:
    """One split: raw uint8 pixels and integer labels."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageSplit:
        return ImageSplit(self.images.to(device), self.labels.to(device))


@dataclass
class ImageData:
    """Train / val / test splits plus what the checkpoint must remember to preprocess new images the same way."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    labels: list[str]
    scale: float
    """Raw pixel value that maps to 1.0 (255, or 16 for scikit-learn digits)."""
    mean: list[float]
    """Per-channel mean of the training split, pixels in [0, 1]."""
    std: list[float]
    """Per-channel standard deviation of the training split, pixels in [0, 1]."""
    dataset: str

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def height(self) -> int:
        return int(self.train.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.train.images.shape[3])

    def to(self, device: torch.device | str) -> ImageData:
        moved = {name: getattr(self, name).to(device) for name in ("train", "val", "test")}
        return ImageData(**moved, labels=self.labels, scale=self.scale, mean=self.mean, std=self.std, dataset=self.dataset)

    def checkpoint_data(self) -> dict[str, Any]:
        """The ``data`` dict of an image-classification checkpoint (docs/ARCHITECTURE.md)."""
        return {
            "labels": list(self.labels), "channels": self.channels, "height": self.height, "width": self.width,
            "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std], "dataset": self.dataset,
        }


def _load_digits() -> RawImages:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
    return RawImages(images, digits.target.astype(np.int64), None, None, [str(i) for i in range(10)])


def load_raw(config: ImageDataConfig) -> RawImages:
    if config.dataset == "digits":
        return _load_digits()
    if config.dataset in IDX_SOURCES:
        return load_idx_dataset(config.dataset, config.resolved_dir(), config.download)
    if config.dataset == "cifar10":
        return load_cifar10(config.resolved_dir(), config.download)
    return load_image_folder(config.resolved_dir(), config.image_size, config.grayscale)


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted index arrays; the held-out part is a seeded random ``fraction`` of ``n``."""
    perm = rng.permutation(n)
    held = max(1, round(n * fraction))
    return np.sort(perm[held:]), np.sort(perm[:held])


def channel_stats(images: torch.Tensor, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images / scale`` (population statistics), in chunks to bound memory."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / scale  # (b, C, H, W)
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() / channels
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant channel: leave it unscaled
    return mean.tolist(), std.tolist()


def load_image_data(config: ImageDataConfig) -> ImageData:
    """Load the dataset, carve deterministic val (and, if needed, test) splits, compute train statistics."""
    raw = load_raw(config)
    num_classes = len(raw.labels)
    for name, y in (("train", raw.train_labels), ("test", raw.test_labels)):
        if y is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{config.dataset}: {name} labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    rng = np.random.default_rng(config.split_seed)
    x, y = raw.train_images, raw.train_labels
    if raw.test_images is None or raw.test_labels is None:
        if len(y) < 3:
            raise DataError(f"{config.dataset}: {len(y)} images are too few to split into train/val/test")
        keep, held = _split(len(y), config.test_fraction, rng)
        test_x, test_y = x[held], y[held]
        x, y = x[keep], y[keep]
    else:
        test_x, test_y = raw.test_images, raw.test_labels
    if len(y) < 2 or len(test_y) == 0:
        raise DataError(f"{config.dataset}: too few images ({len(y)} train, {len(test_y)} test) to train and evaluate")
    keep, held = _split(len(y), config.val_fraction, rng)
    if config.max_train_examples:
        keep = np.sort(rng.permutation(keep)[: config.max_train_examples])
    train = ImageSplit(torch.from_numpy(np.ascontiguousarray(x[keep])), torch.from_numpy(y[keep]))
    val = ImageSplit(torch.from_numpy(np.ascontiguousarray(x[held])), torch.from_numpy(y[held]))
    test = ImageSplit(torch.from_numpy(np.ascontiguousarray(test_x)), torch.from_numpy(np.asarray(test_y)))
    scale = 16.0 if config.dataset == "digits" else 255.0
    mean, std = channel_stats(train.images, scale)
    return ImageData(train, val, test, list(raw.labels), scale, mean, std, config.dataset)


# --- batches ------------------------------------------------------------------------------------------------


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch back to its size; one gather, no Python loop."""
    B, C, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    offsets = torch.randint(0, 2 * padding + 1, (2, B), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(W, device=x.device)  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Preprocessor:
    """uint8 pixels -> normalised float32 model input (optionally augmented), on the pixels' device."""

    def __init__(self, data: ImageData, device: torch.device | str) -> None:
        self.scale = data.scale
        self.mean = torch.tensor(data.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = torch.tensor(data.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(
        self, images: torch.Tensor, *, crop_padding: int = 0, hflip: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.float() / self.scale  # (B, C, H, W) in [0, 1]
        if crop_padding or hflip:
            assert generator is not None, "augmentation needs a generator"
            if crop_padding:
                x = random_crop(x, crop_padding, generator)  # padding is black, as in torchvision
            if hflip:
                x = random_hflip(x, generator)
        return (x - self.mean) / self.std


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None, device: torch.device | str
) -> list[torch.Tensor]:
    """Shuffled (if ``generator``) index batches; a training epoch drops the last short batch when there is more
    than one, since BatchNorm cannot train on a single example."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(device)
    batches = list(order.split(batch_size))
    if generator is not None and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
