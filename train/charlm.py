"""Character-level language model family (``deepserve train charlm``): CharRNN (LSTM/GRU) on a text corpus.

Training is truncated BPTT: the training text is cut into ``train.batch_size`` contiguous streams, each
batch is the next ``data.seq_len`` window of every stream, and the recurrent state is carried from one batch
to the next (detached, so gradients stop at the window edge) and reset at the start of each epoch.
Validation reports nats/char (``val_loss``) and bits/char (``val_bpc``) over the whole validation text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from deepserve.train.config import TrainConfig, check
from deepserve.train.data.text import CharVocab, StreamBatches, TextDataConfig, UNK_ID, load_corpus, split_text
from deepserve.train.models.charlm import CharRNN, CharRNNArgs, State
from deepserve.train.task import Task

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CharLMModelConfig:
    """Architecture of the CharRNN (the vocabulary size comes from the data)."""

    type: Literal["lstm", "gru"] = "lstm"
    """Recurrent cell; also the checkpoint model type."""
    embed_dim: int = 64
    """Width of the character embedding."""
    hidden_size: int = 256
    """Width of each recurrent layer's state."""
    num_layers: int = 1
    """Stacked recurrent layers."""
    dropout: float = 0.0
    """Dropout on embeddings, between layers and before the head."""

    def __post_init__(self) -> None:
        check(self.type in ("lstm", "gru"), "type", "must be 'lstm' or 'gru'", self.type)
        check(self.embed_dim >= 1, "embed_dim", "must be >= 1", self.embed_dim)
        check(self.hidden_size >= 1, "hidden_size", "must be >= 1", self.hidden_size)
        check(self.num_layers >= 1, "num_layers", "must be >= 1", self.num_layers)
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)


def _default_train() -> TrainConfig:
    # The offline default preset charlm-lstm (train/presets/charlm-lstm.yaml): 150 s of training on 2 CPU cores.
    return TrainConfig(
        epochs=10, max_time_s=150.0, batch_size=32, lr=3e-3, weight_decay=0.0, warmup_steps=20,
        min_lr_ratio=0.1, grad_clip=1.0, eval_every=100, patience=3, num_threads=1,
    )


@dataclass
class CharLMRunConfig:
    """Everything a char-LM training run needs; defaults are the offline preset ``charlm-lstm``."""

    train: TrainConfig = field(default_factory=_default_train)
    """Generic loop settings (``batch_size`` = number of parallel text streams)."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Corpus and BPTT window."""
    model: CharLMModelConfig = field(default_factory=CharLMModelConfig)
    """CharRNN architecture."""

    def __post_init__(self) -> None:
        check(isinstance(self.train, TrainConfig), "train", "must be a TrainConfig", self.train)
        check(isinstance(self.data, TextDataConfig), "data", "must be a TextDataConfig", self.data)
        check(isinstance(self.model, CharLMModelConfig), "model", "must be a CharLMModelConfig", self.model)


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)


@torch.no_grad()
def sample_text(
    model: CharRNN, vocab: CharVocab, prompt: str, length: int = 200, temperature: float = 0.8, seed: int = 0
) -> str:
    """``length`` characters sampled after ``prompt`` with a fixed seed (the model's train/eval mode is kept)."""
    device = model.head.weight.device
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = vocab.encode(prompt).to(device).unsqueeze(0)  # (1, P)
        out = model.generate(ids, length, temperature=temperature, generator=generator)  # (1, length)
    finally:
        model.train(was_training)
    return vocab.decode(out[0])


class CharLMTask(Task):
    task = "char-lm"
    monitor = "val_loss"
    monitor_mode = "min"

    config: CharLMRunConfig
    model: CharRNN

    def setup(self) -> None:
        cfg = self.config
        text = load_corpus(cfg.data)
        train_text, val_text = split_text(text, cfg.data.val_fraction)
        self.vocab = CharVocab.from_text(train_text)
        self.train_ids = self.vocab.encode(train_text)  # (N_train,)
        self.val_ids = self.vocab.encode(val_text)  # (N_val,)
        self.train_stream = StreamBatches(self.train_ids, cfg.train.batch_size, cfg.data.seq_len)
        # validation: same stream layout, fewer streams when the text is short (each stream needs >= 1 char)
        val_streams = max(1, min(cfg.train.batch_size, (self.val_ids.numel() - 1) // cfg.data.seq_len))
        self.val_stream = StreamBatches(self.val_ids, val_streams, cfg.data.seq_len)
        self.prompt = "\n" if "\n" in self.vocab.stoi else self.vocab.itos[1]

        m = cfg.model
        self.model_type = m.type
        self.model_args = CharRNNArgs(
            vocab_size=len(self.vocab), cell=m.type, embed_dim=m.embed_dim, hidden_size=m.hidden_size,
            num_layers=m.num_layers, dropout=m.dropout,
        )
        self.model = CharRNN(self.model_args).to(self.device)
        self._state: State | None = None

    def steps_per_epoch(self) -> int:
        return len(self.train_stream)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        self._state = None  # each epoch starts the streams from their beginning with a zero state
        for x, y in self.train_stream:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        x, y = batch  # (B, T), (B, T)
        logits, state = self.model(x, self._state)  # (B, T, V)
        # carry the state to the next window of the same streams, without backpropagating into the past
        self._state = detach_state(state)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return loss, y.numel()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        total, count = 0.0, 0
        state: State | None = None
        for x, y in self.val_stream:
            x, y = x.to(self.device), y.to(self.device)
            logits, state = self.model(x, state)  # (B, T, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        nats = total / count
        return {"val_loss": nats, "val_bpc": nats / math.log(2)}

    def on_evaluate(self, metrics: dict[str, float], log: Callable[[str], Any]) -> None:
        text = sample_text(self.model, self.vocab, self.prompt, length=200, temperature=0.8, seed=0)
        log(f"sample (200 chars, temperature 0.8):\n{text}")

    @torch.no_grad()
    def final_report(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.evaluate()
        finally:
            self.model.train(was_training)

    def checkpoint_data(self) -> dict[str, Any]:
        return {"vocab": list(self.vocab.itos), "unk_id": UNK_ID}


__all__ = ["CharLMModelConfig", "CharLMRunConfig", "CharLMTask", "sample_text"]
