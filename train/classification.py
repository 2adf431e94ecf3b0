"""Image-classification family (``deepserve train classifier``): MLP, LeNet-style CNN or ResNet on digits, MNIST,
Fashion-MNIST, CIFAR-10 or an ImageFolder tree.

The whole dataset lives on the training device as uint8; each batch is gathered by a seeded shuffled index,
scaled to [0, 1], augmented with tensor ops (CIFAR: random crop + flip) and normalised with the training
split's per-channel mean/std, which the checkpoint stores so that serving preprocesses images identically.
Validation accuracy drives early stopping; the final report adds test accuracy and a confusion matrix.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from deepserve.train.config import ConfigError, TrainConfig, check
from deepserve.train.data.download import DataError
from deepserve.train.data.images import ImageData, ImageDataConfig, ImageSplit, Preprocessor, batch_indices, load_image_data
from deepserve.train.models import model_classes
from deepserve.train.task import Task

Batch = tuple[torch.Tensor, torch.Tensor]
ARCHS = ("mlp", "cnn", "resnet")


@dataclass
class ClassifierModelConfig:
    """Architecture of the classifier; input channels, image size and classes come from the data."""

    arch: Literal["mlp", "cnn", "resnet"] = "cnn"
    """Model type: mlp, cnn (LeNet style) or resnet (CIFAR-style ResNet); also the checkpoint model type."""
    hidden: list[int] = field(default_factory=lambda: [128])
    """mlp: hidden layer widths; cnn: widths of the fully connected layers after the conv stages."""
    channels: list[int] = field(default_factory=lambda: [32, 64])
    """cnn: output channels of each conv stage (each followed by 2x2 max pooling)."""
    kernel_size: int = 3
    """cnn: odd convolution kernel size."""
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    """resnet: residual blocks per stage ([2, 2, 2, 2] is ResNet-18)."""
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """resnet: channels of each stage, one per entry of ``blocks``."""
    dropout: float = 0.1
    """Dropout in the classifier head (mlp, cnn: every hidden layer; resnet: before the final Linear)."""
    batch_norm: bool = True
    """mlp, cnn: BatchNorm after every conv / hidden Linear (resnet always uses it)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy training loss (validation/test losses are plain)."""

    def __post_init__(self) -> None:
        check(self.arch in ARCHS, "arch", f"must be one of {list(ARCHS)}", self.arch)
        check(all(h >= 1 for h in self.hidden), "hidden", "must hold widths >= 1", self.hidden)
        check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels",
              "must be a non-empty list of widths >= 1", self.channels)
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "must be odd and >= 1", self.kernel_size)
        check(len(self.blocks) >= 1 and all(b >= 1 for b in self.blocks), "blocks",
              "must be a non-empty list of counts >= 1", self.blocks)
        check(len(self.widths) == len(self.blocks) and all(w >= 1 for w in self.widths), "widths",
              f"must be {len(self.blocks)} widths >= 1 (one per entry of blocks)", self.widths)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)", self.label_smoothing)


def _default_train() -> TrainConfig:
    # The offline default preset digits-cnn (train/presets/digits-cnn.yaml): about 15 s of training on a loaded
    # 2-core machine, ~99% test accuracy. Early stopping is off: 144 validation images saturate val_accuracy
    # long before the cosine schedule ends. One thread: for a model this small, extra threads only add
    # synchronisation, and on a shared machine they make it many times slower.
    return TrainConfig(
        epochs=20, max_time_s=55.0, batch_size=64, lr=3e-3, weight_decay=0.01, warmup_steps=20,
        min_lr_ratio=0.02, grad_clip=1.0, eval_every=0, patience=0, num_threads=1,
    )


def _default_data() -> ImageDataConfig:
    return ImageDataConfig(dataset="digits", augment=True, crop_padding=1, hflip=False)


@dataclass
class ClassifierRunConfig:
    """Everything an image-classification run needs; defaults are the offline preset ``digits-cnn``."""

    train: TrainConfig = field(default_factory=_default_train)
    """Generic loop settings."""
    data: ImageDataConfig = field(default_factory=_default_data)
    """Dataset, splits, augmentation."""
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    """Classifier architecture."""

    def __post_init__(self) -> None:
        check(isinstance(self.train, TrainConfig), "train", "must be a TrainConfig", self.train)
        check(isinstance(self.data, ImageDataConfig), "data", "must be an ImageDataConfig", self.data)
        check(isinstance(self.model, ClassifierModelConfig), "model", "must be a ClassifierModelConfig", self.model)


def model_args_for(model: ClassifierModelConfig, data: ImageData) -> Any:
    """The model's Args dataclass for this config and dataset shape."""
    args_cls, _ = model_classes(model.arch)
    common = {"in_channels": data.channels, "image_size": data.height, "num_classes": len(data.labels),
              "dropout": model.dropout}
    if model.arch == "mlp":
        return args_cls(**common, hidden=list(model.hidden), batch_norm=model.batch_norm)
    if model.arch == "cnn":
        return args_cls(**common, channels=list(model.channels), kernel_size=model.kernel_size,
                        hidden=list(model.hidden), batch_norm=model.batch_norm)
    return args_cls(**common, blocks=list(model.blocks), widths=list(model.widths))


class ClassificationTask(Task):
    task = "image-classification"
    monitor = "val_accuracy"
    monitor_mode = "max"

    config: ClassifierRunConfig

    def setup(self) -> None:
        cfg = self.config
        self.data = load_image_data(cfg.data).to(self.device)
        self.preprocess = Preprocessor(self.data, self.device)
        if self.data.height != self.data.width:
            raise DataError(f"{self.data.dataset}: images must be square, got {self.data.height}x{self.data.width}")
        self.model_type = cfg.model.arch
        try:
            self.model_args = model_args_for(cfg.model, self.data)
        except ConfigError as e:  # e.g. too many pooling stages for the image size: a model.* setting is at fault
            raise ConfigError(f"model.{e}") from None
        _, model_cls = model_classes(self.model_type)
        self.model = model_cls(self.model_args).to(self.device)

    def steps_per_epoch(self) -> int:
        n, batch = len(self.data.train), self.config.train.batch_size
        return n // batch if n > batch else 1  # batch_indices drops a short last batch

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        cfg = self.config
        # one generator per (seed, epoch): resuming at an epoch replays exactly the same shuffles and crops
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
        augment = cfg.data.augment
        train = self.data.train
        for idx in batch_indices(len(train), cfg.train.batch_size, generator, self.device):
            x = self.preprocess(
                train.images[idx], crop_padding=cfg.data.crop_padding if augment else 0,
                hflip=augment and cfg.data.hflip, generator=generator,
            )  # (B, C, H, W)
            yield x, train.labels[idx]

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        logits = self.model(x)  # (B, K)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.model.label_smoothing)
        return loss, len(y)

    @torch.no_grad()
    def predict(self, split: ImageSplit) -> tuple[float, torch.Tensor]:
        """(mean cross-entropy, predicted class per example) over a whole split, in eval batches."""
        total, predictions = 0.0, []
        for idx in batch_indices(len(split), self.config.data.eval_batch_size, None, self.device):
            logits = self.model(self.preprocess(split.images[idx])).float()  # (b, K)
            total += F.cross_entropy(logits, split.labels[idx], reduction="sum").item()
            predictions.append(logits.argmax(dim=1))
        return total / len(split), torch.cat(predictions)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        loss, pred = self.predict(self.data.val)
        accuracy = (pred == self.data.val.labels).float().mean().item()
        return {"val_loss": loss, "val_accuracy": accuracy}

    @torch.no_grad()
    def final_report(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            loss, pred = self.predict(self.data.test)
        finally:
            self.model.train(was_training)
        truth = self.data.test.labels.cpu().numpy()
        pred_np = pred.cpu().numpy()
        self.write_confusion_matrix(truth, pred_np)
        return {"test_accuracy": float((pred_np == truth).mean()), "test_loss": loss}

    def write_confusion_matrix(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """``confusion_matrix.csv`` (rows: true class, columns: predicted) and ``confusion_matrix.png``."""
        from sklearn.metrics import confusion_matrix

        labels = self.data.labels
        matrix = confusion_matrix(truth, pred, labels=list(range(len(labels))))  # (K, K)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "confusion_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *labels])
            for name, row in zip(labels, matrix):
                writer.writerow([name, *row.tolist()])
        plot_confusion_matrix(matrix, labels, self.out_dir / "confusion_matrix.png",
                              title=f"{self.data.dataset} test accuracy {np.trace(matrix) / max(matrix.sum(), 1):.2%}")

    def checkpoint_data(self) -> dict[str, Any]:
        return self.data.checkpoint_data()


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: Any, title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(labels)
    size = min(4 + 0.45 * k, 20)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    long_names = max(len(name) for name in labels) > 3
    ax.set_xticklabels(labels, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticklabels(labels)
    if k <= 30:  # beyond that the counts are unreadable
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


__all__ = ["ClassificationTask", "ClassifierModelConfig", "ClassifierRunConfig", "model_args_for"]
