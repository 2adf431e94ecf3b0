"""Transformer seq2seq family (``deepserve train seq2seq``): question -> answer with a SentencePiece tokenizer.

Data: generated school-maths problems (``data.source: math``) or ``source<TAB>target`` files (``tsv``).
The tokenizer is trained on the training split (sources and targets) and stored in the checkpoint.

Sequences: the source is ``pieces + [EOS]`` (``max_source_length`` counts that EOS); the decoder reads
``[BOS] + answer`` and predicts ``answer + [EOS]`` (``max_target_length`` counts the answer's pieces, not
EOS). Validation reports ``val_loss`` and greedy ``val_exact_match`` (the monitor); the final report gives
greedy exact match on the test and extrapolation splits, overall and per problem type.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from deepserve.train.config import ConfigError, TrainConfig, check
from deepserve.train.data import math_problems
from deepserve.train.data.math_problems import Example
from deepserve.train.data.parallel import Batch, EncodedPair, batches, make_batch, read_tsv
from deepserve.train.models.seq2seq import Seq2SeqArgs, Seq2SeqTransformer, greedy_decode
from deepserve.train.task import Task
from deepserve.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerError, train_tokenizer


@dataclass
class Seq2SeqDataConfig:
    """Where the (source, target) pairs come from, split sizes and sequence limits."""

    source: Literal["math", "tsv"] = "math"
    """``math``: generated maths problems; ``tsv``: ``source<TAB>target`` files."""
    tasks: list[str] = field(default_factory=lambda: ["place_value"])
    """math: problem types to mix, of place_value, sort, add_sub, linear_1d (sizes are shared equally)."""
    train_size: int = 60000
    """math: training examples."""
    val_size: int = 400
    """math: validation examples (greedy exact match is computed on all of them at each evaluation)."""
    test_size: int = 2000
    """math: test examples (disjoint from train and val by question)."""
    extrapolate_size: int = 2000
    """math: extrapolation examples (larger numbers, longer lists); 0: none."""
    seed: int = 1234
    """math: generator seed (the data do not depend on ``train.seed``)."""
    train_path: str = ""
    """tsv: training file (required)."""
    val_path: str = ""
    """tsv: validation file; empty: hold out ``val_fraction`` of the training file."""
    test_path: str = ""
    """tsv: test file (optional)."""
    extrapolate_path: str = ""
    """tsv: a second, harder test file reported as ``extrapolate_*`` (optional)."""
    val_fraction: float = 0.05
    """tsv without ``val_path``: fraction of the training lines held out for validation."""
    max_source_length: int = 96
    """Longest source in pieces, counting its EOS; longer examples are a config error."""
    max_target_length: int = 48
    """Longest target in pieces (EOS not counted); also the greedy decoding limit."""
    decode_batch_size: int = 512
    """Rows per greedy-decoding batch in evaluation."""

    def __post_init__(self) -> None:
        check(self.source in ("math", "tsv"), "source", "must be 'math' or 'tsv'", self.source)
        check(len(self.tasks) >= 1, "tasks", "must name at least one problem type", self.tasks)
        for name in self.tasks:
            check(name in math_problems.TASKS, "tasks", f"must be among {list(math_problems.TASKS)}", name)
        check(len(set(self.tasks)) == len(self.tasks), "tasks", "must not repeat a problem type", self.tasks)
        check(self.train_size >= 1, "train_size", "must be >= 1", self.train_size)
        check(self.val_size >= 1, "val_size", "must be >= 1", self.val_size)
        check(self.test_size >= 0, "test_size", "must be >= 0", self.test_size)
        check(self.extrapolate_size >= 0, "extrapolate_size", "must be >= 0", self.extrapolate_size)
        check(self.source != "tsv" or bool(self.train_path), "train_path", "is required when source is 'tsv'",
              self.train_path)
        check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)", self.val_fraction)
        check(self.max_source_length >= 2, "max_source_length", "must be >= 2", self.max_source_length)
        check(self.max_target_length >= 1, "max_target_length", "must be >= 1", self.max_target_length)
        check(self.decode_batch_size >= 1, "decode_batch_size", "must be >= 1", self.decode_batch_size)


@dataclass
class TokenizerConfig:
    """SentencePiece settings (ids are fixed: pad 0, unk 1, bos 2, eos 3)."""

    type: Literal["bpe", "unigram", "char"] = "bpe"
    """SentencePiece model type."""
    vocab_size: int = 256
    """Upper bound on the vocabulary (small corpora, and ``char``, get what the data support)."""
    split_digits: bool = True
    """Every digit its own piece; arithmetic needs it."""
    character_coverage: float = 1.0
    """Fraction of characters covered by the vocabulary (rarer ones become unk)."""

    def __post_init__(self) -> None:
        check(self.type in ("bpe", "unigram", "char"), "type", "must be bpe, unigram or char", self.type)
        check(self.vocab_size >= 8, "vocab_size", "must be >= 8", self.vocab_size)
        check(0.9 <= self.character_coverage <= 1.0, "character_coverage", "must be in [0.9, 1]", self.character_coverage)


@dataclass
class Seq2SeqModelConfig:
    """Transformer architecture (vocabulary size and max_len come from the data) and loss."""

    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 8
    """Attention heads (must divide d_model); 8 learn place value markedly faster than 4."""
    n_encoder_layers: int = 2
    """Encoder blocks."""
    n_decoder_layers: int = 2
    """Decoder blocks."""
    d_ff: int = 256
    """Feed-forward hidden width."""
    dropout: float = 0.0
    """Dropout in training (generated data are plentiful, so none by default)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy (validation loss is unsmoothed)."""

    def __post_init__(self) -> None:
        check(self.d_model >= 2 and self.d_model % 2 == 0, "d_model", "must be an even number >= 2", self.d_model)
        check(self.n_heads >= 1 and self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}",
              self.n_heads)
        check(self.n_encoder_layers >= 1, "n_encoder_layers", "must be >= 1", self.n_encoder_layers)
        check(self.n_decoder_layers >= 1, "n_decoder_layers", "must be >= 1", self.n_decoder_layers)
        check(self.d_ff >= 1, "d_ff", "must be >= 1", self.d_ff)
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)", self.label_smoothing)


def _default_train() -> TrainConfig:
    # the default preset seq2seq-math (train/presets/seq2seq-math.yaml)
    return TrainConfig(
        epochs=50, max_time_s=270.0, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=100,
        min_lr_ratio=0.05, grad_clip=1.0, eval_every=250, patience=0,
    )


@dataclass
class Seq2SeqRunConfig:
    """Everything a seq2seq training run needs; defaults are the offline preset ``seq2seq-math``."""

    train: TrainConfig = field(default_factory=_default_train)
    """Generic loop settings."""
    data: Seq2SeqDataConfig = field(default_factory=Seq2SeqDataConfig)
    """Data source, splits and length limits."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """SentencePiece tokenizer trained on the training split."""
    model: Seq2SeqModelConfig = field(default_factory=Seq2SeqModelConfig)
    """Transformer architecture and loss."""

    def __post_init__(self) -> None:
        check(isinstance(self.train, TrainConfig), "train", "must be a TrainConfig", self.train)
        check(isinstance(self.data, Seq2SeqDataConfig), "data", "must be a Seq2SeqDataConfig", self.data)
        check(isinstance(self.tokenizer, TokenizerConfig), "tokenizer", "must be a TokenizerConfig", self.tokenizer)
        check(isinstance(self.model, Seq2SeqModelConfig), "model", "must be a Seq2SeqModelConfig", self.model)


def load_splits(data: Seq2SeqDataConfig) -> dict[str, list[Example]]:
    """train / val / test / extrapolate examples (test and extrapolate may be empty for tsv)."""
    if data.source == "math":
        try:
            return math_problems.make_splits(
                data.tasks, n_train=data.train_size, n_val=data.val_size, n_test=data.test_size,
                n_extrapolate=data.extrapolate_size, seed=data.seed,
            )
        except ValueError as e:
            raise ConfigError(f"data: {e}; ask for fewer examples (data.train_size/val_size/test_size)") from None
    train = read_tsv(data.train_path)
    if data.val_path:
        val = read_tsv(data.val_path)
    else:
        order = list(range(len(train)))
        random.Random(data.seed).shuffle(order)
        n_val = max(1, round(len(train) * data.val_fraction))
        if n_val >= len(train):
            raise ConfigError(
                f"data.train_path {data.train_path} has {len(train)} example(s); too few to hold out validation"
            )
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    test = read_tsv(data.test_path) if data.test_path else []
    extrapolate = read_tsv(data.extrapolate_path) if data.extrapolate_path else []
    return {"train": train, "val": val, "test": test, "extrapolate": extrapolate}


def encode_examples(
    tokenizer: Tokenizer, examples: Sequence[Example], data: Seq2SeqDataConfig, split: str
) -> list[EncodedPair]:
    """Encode pairs (source + EOS); an example over the length limits is a config error naming it."""
    sources = tokenizer.encode_batch([e.source for e in examples])
    targets = tokenizer.encode_batch([e.target for e in examples])
    pairs = []
    for i, (e, src, tgt) in enumerate(zip(examples, sources, targets)):
        if len(src) + 1 > data.max_source_length:
            raise ConfigError(f"data.max_source_length is {data.max_source_length} but {split} example {i + 1} has "
                              f"{len(src) + 1} source pieces (with EOS): {e.source[:60]!r}; raise the limit")
        if len(tgt) > data.max_target_length:
            raise ConfigError(f"data.max_target_length is {data.max_target_length} but {split} example {i + 1} has "
                              f"{len(tgt)} target pieces: {e.target[:60]!r}; raise the limit")
        pairs.append(EncodedPair([*src, EOS_ID], tgt))
    return pairs


class Seq2SeqTask(Task):
    task = "seq2seq"
    monitor = "val_exact_match"
    monitor_mode = "max"

    config: Seq2SeqRunConfig
    model: Seq2SeqTransformer

    def setup(self) -> None:
        cfg = self.config
        self.splits = load_splits(cfg.data)
        train = self.splits["train"]
        try:
            self.spm_model = train_tokenizer(
                [t for e in train for t in (e.source, e.target)], model_type=cfg.tokenizer.type,
                vocab_size=cfg.tokenizer.vocab_size, split_digits=cfg.tokenizer.split_digits,
                character_coverage=cfg.tokenizer.character_coverage,
            )
        except TokenizerError as e:
            raise ConfigError(f"tokenizer: {e}") from None
        self.tokenizer = Tokenizer(self.spm_model)
        self.encoded = {name: encode_examples(self.tokenizer, ex, cfg.data, name) for name, ex in self.splits.items()}

        m = cfg.model
        self.model_type = "transformer"
        self.model_args = Seq2SeqArgs(
            vocab_size=self.tokenizer.vocab_size, d_model=m.d_model, n_heads=m.n_heads,
            n_encoder_layers=m.n_encoder_layers, n_decoder_layers=m.n_decoder_layers, d_ff=m.d_ff,
            dropout=m.dropout, max_len=max(cfg.data.max_source_length, cfg.data.max_target_length + 1), pad_id=PAD_ID,
        )
        self.model = Seq2SeqTransformer(self.model_args).to(self.device)
        self.samples: list[tuple[Example, str]] = []

    def steps_per_epoch(self) -> int:
        return -(-len(self.encoded["train"]) // self.config.train.batch_size)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Shuffled batches of similar source length (less padding): sort within windows of 32 batches."""
        bs = self.config.train.batch_size
        pairs = self.encoded["train"]
        rng = random.Random(self.config.train.seed * 100_003 + epoch)
        order = list(range(len(pairs)))
        rng.shuffle(order)
        chunks = []
        for start in range(0, len(order), 32 * bs):
            window = sorted(order[start : start + 32 * bs], key=lambda i: len(pairs[i].src))
            chunks += [window[j : j + bs] for j in range(0, len(window), bs)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield make_batch([pairs[i] for i in chunk], pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, device=self.device)

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = self.model(batch.src, batch.tgt_in)  # (B,T,V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                               label_smoothing=self.config.model.label_smoothing)
        return loss, len(batch)

    @torch.no_grad()
    def loss_on(self, split: str) -> float:
        total, count = 0.0, 0
        for batch in batches(self.encoded[split], self.config.data.decode_batch_size, pad_id=PAD_ID, bos_id=BOS_ID,
                             eos_id=EOS_ID, device=self.device):
            logits = self.model(batch.src, batch.tgt_in)  # (B,T,V)
            total += F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                                     reduction="sum").item()
            count += int(batch.tgt_out.ne(PAD_ID).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def predict(self, split: str) -> list[str]:
        """Greedy answers for every example of ``split``, decoded to text, in order."""
        pairs = self.encoded[split]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].src))  # similar lengths decode together
        out: list[str] = [""] * len(pairs)
        bs = self.config.data.decode_batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            batch = make_batch([pairs[i] for i in idx], pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, device=self.device)
            for i, ids in zip(idx, greedy_decode(self.model, batch.src, self.config.data.max_target_length, BOS_ID, EOS_ID)):
                out[i] = self.tokenizer.decode(ids)
        return out

    def exact_match(self, split: str) -> dict[str, float]:
        """``<split>_exact_match`` and, with several problem types, ``<split>_exact_match_<type>``."""
        examples = self.splits[split]
        predictions = self.predict(split)
        hits: dict[str, list[bool]] = defaultdict(list)
        for e, p in zip(examples, predictions):
            hits[e.kind].append(p.strip() == e.target.strip())
        metrics = {f"{split}_exact_match": sum(sum(h) for h in hits.values()) / max(len(examples), 1)}
        if len(hits) > 1:
            metrics.update({f"{split}_exact_match_{kind}": sum(h) / len(h) for kind, h in sorted(hits.items())})
        self.samples = list(zip(examples, predictions))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"val_loss": self.loss_on("val"), **self.exact_match("val")}

    def on_evaluate(self, metrics: dict[str, float], log: Callable[[str], Any]) -> None:
        shown: dict[str, str] = {}
        for e, p in self.samples:  # one sample per problem type
            shown.setdefault(e.kind, f"  {e.source} -> {p!r} ({'ok' if p == e.target else 'want ' + repr(e.target)})")
        log("samples:\n" + "\n".join(shown.values()))

    @torch.no_grad()
    def final_report(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            metrics: dict[str, float] = {}
            for split in ("test", "extrapolate"):
                if not self.splits[split]:
                    continue
                metrics[f"{split}_loss"] = self.loss_on(split)
                metrics.update(self.exact_match(split))
                self._write_predictions(split)
            return metrics
        finally:
            self.model.train(was_training)

    def _write_predictions(self, split: str) -> None:
        """``predictions_<split>.tsv``: source, target, prediction, ok (for error analysis)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = ["kind\tsource\ttarget\tprediction\tok"]
        lines += [f"{e.kind}\t{e.source}\t{e.target}\t{p}\t{int(p.strip() == e.target.strip())}" for e, p in self.samples]
        (Path(self.out_dir) / f"predictions_{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def checkpoint_data(self) -> dict[str, Any]:
        return {
            "spm_model": self.spm_model,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "max_source_length": self.config.data.max_source_length,
            "max_target_length": self.config.data.max_target_length,
            "tokenizer_type": self.config.tokenizer.type,
        }


__all__ = ["Seq2SeqDataConfig", "Seq2SeqModelConfig", "Seq2SeqRunConfig", "Seq2SeqTask", "TokenizerConfig", "load_splits"]
