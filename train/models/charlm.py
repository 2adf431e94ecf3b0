"""Character-level recurrent language model (LSTM or GRU), char-rnn style.

tokens -> embedding -> multi-layer LSTM/GRU (batch_first) -> dropout -> linear head over the vocabulary.
The recurrent state is an explicit input and output so that serving can step it one token (or chunk) at a
time; state is ``(h, c)`` for LSTM and ``(h,)`` for GRU, each ``(L, B, H)``. ``prefill`` consumes a whole
prompt and returns only the last position's logits.

Export: the exporter wraps ``forward`` (the ``step`` graph) and ``prefill`` (the ``prefill`` graph) as
``(tokens, h, c) -> (logits, h_out, c_out)`` (GRU: no ``c``) and traces them (TorchScript) or exports them with
ONNX opset 17; nothing in either depends on concrete sizes, so the batch and time axes stay dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepserve.train.config import check

State = tuple[torch.Tensor, ...]


@dataclass
class CharRNNArgs:
    """Architecture of a ``CharRNN``; stored as checkpoint ``model.args``."""

    vocab_size: int
    """Number of token ids, including ``<unk>`` at index 0."""
    cell: Literal["lstm", "gru"] = "lstm"
    """Recurrent cell type."""
    embed_dim: int = 64
    """Width of the character embedding."""
    hidden_size: int = 256
    """Width of the recurrent state of each layer."""
    num_layers: int = 1
    """Number of stacked recurrent layers."""
    dropout: float = 0.0
    """Dropout on the embedding, between recurrent layers and before the head (training only)."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 2, "vocab_size", "must be >= 2", self.vocab_size)
        check(self.cell in ("lstm", "gru"), "cell", "must be 'lstm' or 'gru'", self.cell)
        check(self.embed_dim >= 1, "embed_dim", "must be >= 1", self.embed_dim)
        check(self.hidden_size >= 1, "hidden_size", "must be >= 1", self.hidden_size)
        check(self.num_layers >= 1, "num_layers", "must be >= 1", self.num_layers)
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)


class CharRNN(nn.Module):
    def __init__(self, args: CharRNNArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.embed_dim)
        rnn_cls = nn.LSTM if args.cell == "lstm" else nn.GRU
        # torch warns about inter-layer dropout on a single layer, so pass it only when it applies
        self.rnn = rnn_cls(
            args.embed_dim,
            args.hidden_size,
            num_layers=args.num_layers,
            dropout=args.dropout if args.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(args.dropout)
        self.head = nn.Linear(args.hidden_size, args.vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero state for ``batch_size`` rows: ``(h, c)`` for LSTM, ``(h,)`` for GRU, each ``(L, B, H)``."""
        if device is None:
            device = self.head.weight.device
        shape = (self.args.num_layers, batch_size, self.args.hidden_size)
        h = torch.zeros(shape, device=device)
        if self.args.cell == "lstm":
            return (h, torch.zeros(shape, device=device))
        return (h,)

    def _recur(self, tokens: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """tokens ``(B, T)`` -> recurrent outputs ``(B, T, H)`` after dropout, new state."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.drop(self.embed(tokens))  # (B, T, E)
        if self.args.cell == "lstm":
            h, c = state  # (L, B, H) each
            y, (h, c) = self.rnn(x, (h, c))  # y: (B, T, H)
            return self.drop(y), (h, c)
        (h,) = state
        y, h = self.rnn(x, h)  # y: (B, T, H)
        return self.drop(y), (h,)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens ``(B, T)`` int64, state as from ``init_state`` (None: zeros) -> logits ``(B, T, V)``, new state."""
        y, new_state = self._recur(tokens, state)
        return self.head(y), new_state  # (B, T, V)

    def prefill(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """A whole prompt in one call: tokens ``(B, T)`` -> the last position's logits ``(B, V)``, new state.

        The same recurrence as ``forward`` over all T tokens; the head runs on the last position only, the one
        a decoder samples from."""
        y, new_state = self._recur(tokens, state)
        return self.head(y[:, -1, :]), new_state  # (B, V)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` ids after ``prompt`` ``(B, P)``; returns ``(B, max_new_tokens)``.

        Never samples id 0 (``<unk>``): it carries no character to print.
        """
        logits, state = self(prompt)  # (B, P, V)
        last = logits[:, -1, :]  # (B, V)
        out = []
        for _ in range(max_new_tokens):
            scaled = last.float() / max(temperature, 1e-6)
            scaled[:, 0] = float("-inf")
            probs = F.softmax(scaled, dim=-1)  # (B, V)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out.append(nxt)
            logits, state = self(nxt, state)
            last = logits[:, -1, :]
        return torch.cat(out, dim=1)
