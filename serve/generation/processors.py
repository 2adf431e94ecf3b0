"""Logit processors (Hugging Face semantics). Built only for the features a request asks for, so the default
decoding path runs none of this code.

Each processor edits a request's block of scores ``[rows, V]`` in place, given each row's token history
(char-LM: prompt + generated; seq2seq: generated only, as Hugging Face does for encoder-decoders) and the
number of tokens generated so far.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from deepserve.serve.generation.params import GenerationParams


class Processor(Protocol):
    needs_history: bool

    def __call__(self, scores: np.ndarray, histories: list[list[int]], generated: int) -> None: ...


class RepetitionPenalty:
    """Tokens already in the row's history: positive scores divided by the penalty, negative multiplied."""

    needs_history = True

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, scores: np.ndarray, histories: list[list[int]], generated: int) -> None:
        for r, history in enumerate(histories):
            if not history:
                continue
            ids = np.unique(np.asarray(history, np.int64))
            s = scores[r, ids]
            scores[r, ids] = np.where(s < 0, s * self.penalty, s / self.penalty)


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the row's history."""

    needs_history = True

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, scores: np.ndarray, histories: list[list[int]], generated: int) -> None:
        n = self.n
        for r, h in enumerate(histories):
            if len(h) + 1 < n:
                continue
            prefix = tuple(h[len(h) - n + 1 :]) if n > 1 else ()
            banned = [h[i + n - 1] for i in range(len(h) - n + 1) if tuple(h[i : i + n - 1]) == prefix]
            if banned:
                scores[r, banned] = -np.inf


class MinNewTokens:
    """EOS is impossible until ``min_new_tokens`` tokens were generated."""

    needs_history = False

    def __init__(self, min_new_tokens: int, eos_id: int) -> None:
        self.min_new_tokens, self.eos_id = min_new_tokens, eos_id

    def __call__(self, scores: np.ndarray, histories: list[list[int]], generated: int) -> None:
        if generated < self.min_new_tokens:
            scores[:, self.eos_id] = -np.inf


def build_processors(params: GenerationParams, eos_id: int | None) -> list[Processor]:
    """The processors ``params`` asks for; empty for the defaults."""
    out: list[Processor] = []
    if params.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        out.append(NoRepeatNGram(params.no_repeat_ngram_size))
    if params.min_new_tokens > 0 and eos_id is not None:
        out.append(MinNewTokens(params.min_new_tokens, eos_id))
    return out
