"""One generic training loop for every model family.

AdamW (no decay on biases and norms), linear warmup then cosine decay (over steps, or over the time budget
when ``max_time_s`` is set, whichever is further along), gradient clipping, mixed precision on CUDA, early
stopping on the task's monitored metric, resume from the checkpoint's ``train_state``, a progress bar,
TensorBoard scalars and loss/metric curves as PNG.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepserve.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepserve.train.config import ConfigError, TrainConfig, build_config, to_dict
from deepserve.train.models import args_dict
from deepserve.train.task import Task, family_classes

Log = Callable[[str], None]


@dataclass
class TrainResult:
    checkpoint: Path
    """Where the best model was written."""
    metrics: dict[str, float]
    """Final metrics: best validation metrics plus the task's test report."""
    steps: int
    elapsed_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is available")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Warmup for ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` as progress goes 0 → 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


class _Logger:
    """TensorBoard scalars (optional) and the metric history used for curves."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.history: list[dict[str, float]] = []
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in the `train` extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.history.append({"step": float(step), **values})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in history for k in row if k != "step"})
    losses = [k for k in keys if "loss" in k]
    others = [k for k in keys if k not in losses and k != "lr"]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 6, 4), squeeze=False)
    for ax, group, title in ((axes[0][0], losses, "loss"), (axes[0][-1], others, "metrics")):
        if not group or (ax is axes[0][0] and title == "metrics"):
            continue
        for key in group:
            points = [(row["step"], row[key]) for row in history if key in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(cfg: TrainConfig, total: int | None, desc: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, `make serve` piped to a file).
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None, mininterval=0.5)


def run_training(
    family: str,
    config: Any,
    *,
    out_path: str | Path,
    resume: bool = False,
    log: Log = print,
) -> TrainResult:
    """Train ``family`` (``classifier | charlm | seq2seq``) with ``config`` (its run-config dataclass, or a
    dict of it) and write the best model to ``out_path``; side files go to ``out_path`` without suffix."""
    run = _Run(family, config, Path(out_path), log)
    if resume:
        run.resume()
    run.train()
    return run.finish()


@dataclass
class _Counters:
    """Where a run stands; saved as a dict in the checkpoint's ``train_state["state"]`` for resuming."""

    step: int = 0
    epoch: int = 0
    best: float = -math.inf
    """The best monitored score so far, signed so that higher is better."""
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    """Evaluations in a row without a better score (early stopping's count)."""
    elapsed: float = 0.0
    last_eval_step: int = -1


class _Run:
    """One training run: the task, model, optimiser and precision set up once, then driven by
    ``run_training`` through resume, the epochs and the final report."""

    def __init__(self, family: str, config: Any, out_path: Path, log: Log) -> None:
        config_cls, task_cls = family_classes(family)
        if isinstance(config, dict):
            config = build_config(config_cls, config)
        self.family, self.config, self.out_path, self.log = family, config, out_path, log
        self.cfg: TrainConfig = config.train
        self.out_dir = out_path.with_suffix("")
        self.out_dir.mkdir(parents=True, exist_ok=True)

        seed_everything(self.cfg.seed)  # before the task builds its model and data
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        device = select_device(self.cfg.device)
        self.task: Task = task_cls(config, device, self.out_dir)
        self.task.setup()
        self.model = self.task.model.to(device)
        self.optimizer = make_optimizer(self.model, self.cfg)

        use_amp = self.cfg.amp and device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else nullcontext

        self.sign = 1.0 if self.task.monitor_mode == "max" else -1.0
        self.state = _Counters()
        self.best_weights = copy.deepcopy(self.model.state_dict())
        self.logger = _Logger(self.out_dir, self.cfg.tensorboard)

    def resume(self) -> None:
        payload = _resume(self.out_path, self.model, self.optimizer, self.state, self.logger, self.log)
        self.best_weights = copy.deepcopy(payload["state_dict"])

    def train(self) -> None:
        """Epochs until the epoch count, ``max_steps``, ``max_time_s`` or early stopping ends them; every epoch
        ends with an evaluation unless its last step was just evaluated."""
        steps_per_epoch = self.task.steps_per_epoch()
        total_steps = self.cfg.max_steps or (self.cfg.epochs * steps_per_epoch if steps_per_epoch else 0)
        start = time.monotonic() - self.state.elapsed
        stop = False
        self.model.train()
        bar = _progress(self.cfg, total_steps or None, f"train {self.family}")
        try:
            while not stop and self.state.epoch < self.cfg.epochs:
                stop = self._epoch(start, total_steps, bar)
                self.state.epoch += 1
                if self.state.last_eval_step != self.state.step:
                    stop = self._evaluate() or stop
        finally:
            if bar is not None:
                bar.close()
        self.state.elapsed = time.monotonic() - start

    def _epoch(self, start: float, total_steps: int, bar: Any) -> bool:
        """One pass over the training batches; True when a limit or early stopping ends training."""
        cfg, state = self.cfg, self.state
        items_since, t_since = 0, time.monotonic()
        for batch in self.task.train_batches(state.epoch):
            elapsed = time.monotonic() - start
            progress = max(state.step / total_steps if total_steps else 0.0,
                           elapsed / cfg.max_time_s if cfg.max_time_s else 0.0)
            lr = lr_at(cfg, state.step, progress)
            loss, items = self._step(batch, lr)
            items_since += items
            if not math.isfinite(loss):
                raise RuntimeError(f"training diverged at step {state.step} (loss {loss}); lower train.lr")
            if state.step % 10 == 0:
                self.logger.scalars(state.step, {"train_loss": loss, "lr": lr})
            if bar is not None:
                now = time.monotonic()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", items_s=f"{items_since / max(now - t_since, 1e-9):.0f}")
            out_of_time = bool(cfg.max_time_s) and time.monotonic() - start >= cfg.max_time_s
            out_of_steps = bool(cfg.max_steps) and state.step >= cfg.max_steps
            stop = False
            if cfg.eval_every and state.step % cfg.eval_every == 0 and not (out_of_time or out_of_steps):
                stop = self._evaluate()
            if stop or out_of_time or out_of_steps:
                return True
        return False

    def _step(self, batch: Any, lr: float) -> tuple[float, int]:
        """One optimiser step at ``lr``; returns the batch's loss and item count."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss, items = self.task.training_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        return loss.item(), items

    def _evaluate(self) -> bool:
        """Evaluate, keep the best weights, return True when early stopping says stop."""
        state, task = self.state, self.task
        state.last_eval_step = state.step
        self.model.eval()
        metrics = task.evaluate()
        self.model.train()
        self.logger.scalars(state.step, metrics)
        if task.monitor not in metrics:
            raise RuntimeError(f"{type(task).__name__}.evaluate() did not report its monitor {task.monitor!r}")
        summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.log(f"step {state.step} epoch {state.epoch} {summary}")
        task.on_evaluate(metrics, self.log)
        score = self.sign * metrics[task.monitor]
        if score > state.best:
            state.best, state.best_metrics, state.bad_evals = score, dict(metrics), 0
            self.best_weights.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
            self._checkpoint(metrics)
        else:
            state.bad_evals += 1
        return bool(self.cfg.patience) and state.bad_evals >= self.cfg.patience

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        """Write the best weights with ``metrics``, and what resuming needs (the latest weights, the
        optimiser, the counters, the history)."""
        task = self.task
        save_checkpoint(
            self.out_path,
            task=task.task,
            model_type=task.model_type,
            model_args=args_dict(task.model_args),
            state_dict=self.best_weights,
            config=to_dict(self.config),
            data=task.checkpoint_data(),
            metrics=metrics,
            train_state={
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "state": asdict(self.state),
                "history": self.logger.history,
            },
        )

    def finish(self) -> TrainResult:
        """Restore the best weights, add the task's final report, write the checkpoint and the curves."""
        state, logger = self.state, self.logger
        self.model.load_state_dict(self.best_weights)
        self.model.eval()
        report = self.task.final_report()
        metrics = {**state.best_metrics, **report, "train_time_s": state.elapsed, "steps": float(state.step)}
        self._checkpoint(metrics)
        logger.scalars(state.step, report)
        logger.close()
        if len(logger.history) > 1:
            save_curves(logger.history, self.out_dir / "curves.png")
        self.log("final " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return TrainResult(self.out_path, metrics, state.step, state.elapsed, logger.history)


def _resume(out_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            state: _Counters, logger: _Logger, log: Log) -> dict[str, Any]:
    """Restore the model, optimiser, counters and history from ``out_path``; returns the checkpoint read."""
    payload = load_checkpoint(out_path)
    saved = payload.get("train_state")
    if not saved:
        raise CheckpointError(f"checkpoint {out_path} has no training state to resume from")
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {out_path} does not match this model config: {e}") from None
    optimizer.load_state_dict(saved["optimizer"])
    for name, value in saved["state"].items():
        setattr(state, name, value)
    logger.history.extend(saved.get("history", []))
    log(f"resumed from {out_path} at step {state.step} (epoch {state.epoch})")
    return payload
