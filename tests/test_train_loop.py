"""The generic loop, driven by a toy family registered for the test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deepserve.train import task as task_module
from deepserve.train.checkpoint import CheckpointError, load_checkpoint
from deepserve.train.config import ConfigError, TrainConfig, build_config
from deepserve.train.loop import lr_at, run_training
from deepserve.train.task import Task


@dataclass
class ToyArgs:
    dim: int = 4


class ToyModel(nn.Module):
    def __init__(self, args: ToyArgs) -> None:
        super().__init__()
        self.linear = nn.Linear(args.dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@dataclass
class ToyRunConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_steps=2,
                                                                   progress=False, tensorboard=False))
    noise: float = 0.0


class ToyTask(Task):
    task = "image-classification"
    evaluations = 0

    def setup(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 4, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.model_type, self.model_args = "toy", ToyArgs()
        self.model = ToyModel(self.model_args)

    def steps_per_epoch(self) -> int:
        return 256 // 16

    def train_batches(self, epoch: int):
        for i in range(0, 256, 16):
            yield self.x[i : i + 16], self.y[i : i + 16]

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y), len(y)

    def evaluate(self) -> dict[str, float]:
        ToyTask.evaluations += 1
        loss = nn.functional.cross_entropy(self.model(self.x), self.y).item()
        return {"val_loss": loss + self.config.noise * ToyTask.evaluations}

    def final_report(self) -> dict[str, float]:
        return {"test_loss": nn.functional.cross_entropy(self.model(self.x), self.y).item()}

    def checkpoint_data(self) -> dict:
        return {"labels": ["a", "b"]}


@pytest.fixture(autouse=True)
def toy_family(monkeypatch):
    monkeypatch.setitem(task_module.FAMILIES, "toy", (__name__, "ToyRunConfig", "ToyTask"))
    ToyTask.evaluations = 0


def test_training_lowers_loss_and_writes_checkpoint(tmp_path: Path) -> None:
    result = run_training("toy", ToyRunConfig(), out_path=tmp_path / "toy.pt", log=lambda s: None)
    payload = load_checkpoint(result.checkpoint)
    assert payload["task"] == "image-classification"
    assert payload["model"] == {"type": "toy", "args": {"dim": 4}}
    assert payload["config"]["train"]["epochs"] == 3
    assert payload["data"] == {"labels": ["a", "b"]}
    assert result.metrics["test_loss"] < 0.45  # chance level is ln 2 = 0.69
    assert result.steps == 3 * 16
    assert (tmp_path / "toy" / "curves.png").stat().st_size > 1000


def test_early_stopping_stops_when_validation_gets_worse(tmp_path: Path) -> None:
    config = ToyRunConfig(noise=10.0)  # each evaluation looks worse than the one before
    config.train.epochs, config.train.patience = 20, 2
    result = run_training("toy", config, out_path=tmp_path / "toy.pt", log=lambda s: None)
    assert ToyTask.evaluations == 3  # the first, then two without improvement
    assert result.steps == 3 * 16


def test_max_steps_and_resume_continue_counting(tmp_path: Path) -> None:
    config = ToyRunConfig()
    config.train.max_steps = 5
    first = run_training("toy", config, out_path=tmp_path / "toy.pt", log=lambda s: None)
    assert first.steps == 5
    config.train.max_steps = 9
    logs: list[str] = []
    second = run_training("toy", config, out_path=tmp_path / "toy.pt", resume=True, log=logs.append)
    assert second.steps == 9
    assert any("resumed" in line and "step 5" in line for line in logs)


def test_resume_without_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="toy.pt"):
        run_training("toy", ToyRunConfig(), out_path=tmp_path / "toy.pt", resume=True, log=lambda s: None)


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"lr": -1}}, "lr must be > 0, got -1"),
        ({"train": {"batch_size": "big"}}, "train.batch_size must be an integer, got 'big'"),
        ({"train": {"device": "tpu"}}, "train.device must be one of"),
        ({"train": {"learning_rate": 1}}, "unknown config key train.learning_rate"),
    ],
)
def test_bad_config_names_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(ToyRunConfig, raw)


def test_partial_section_keeps_the_family_defaults_of_that_section() -> None:
    config = build_config(ToyRunConfig, {"train": {"lr": "3e-3"}})
    assert config.train.lr == 0.003  # YAML 1.1 reads 3e-3 as a string
    assert config.train.epochs == 3 and config.train.warmup_steps == 2  # ToyRunConfig's, not TrainConfig's
