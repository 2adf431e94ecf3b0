"""Request parameters for text generation, as the server applies them, and the logit processors they ask for.

The parameters themselves, their bounds and their meaning are declared once, in ``deepserve.generation`` (the
contract the SDK shares). Here they fail as HTTP 400s: an ``InvalidParameter`` carries the parameter's name and
value as data (the OpenAI error's ``param`` comes from it), and ``Limits`` adds the server's caps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from deepserve import generation
from deepserve.generation import MAX_LOGPROBS, ParameterError  # noqa: F401  (re-exported)
from deepserve.serve.errors import BadRequest

DEFAULT_MAX_NEW_TOKENS = 64
"""Used when a request does not say; lowered to the server's cap when that is smaller."""


class InvalidParameter(BadRequest):
    """A 400 naming one request parameter: ``parameter`` and ``value`` are data, the message says why. Over a
    server cap, ``reject_reason`` says which (counted in ``deepserve_rejected_requests``)."""

    def __init__(self, error: ParameterError, *, reject_reason: str | None = None) -> None:
        super().__init__(error.message)
        self.error, self.parameter, self.reject_reason = error, error.parameter, reject_reason

    @classmethod
    def of(cls, parameter: str, reason: str, value: Any) -> InvalidParameter:
        return cls(ParameterError(parameter, reason, value))


def check(condition: bool, name: str, message: str, value: Any, limit: str | None = None) -> None:
    """Raise ``InvalidParameter('<name> <message>, got <value>')`` unless ``condition`` (counted under ``limit``
    for a server cap)."""
    if not condition:
        raise InvalidParameter(ParameterError(name, message, value), reject_reason=limit)


@dataclass(kw_only=True)
class GenerationParams(generation.GenerationParams):
    """``deepserve.generation.GenerationParams`` whose errors are HTTP 400s (``InvalidParameter``)."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ParameterError as e:
            raise InvalidParameter(e) from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, *, where: str = "parameters") -> GenerationParams:
        try:
            return super().from_dict(raw, where=where)  # type: ignore[return-value]
        except ParameterError as e:
            raise InvalidParameter(e) from None


@dataclass(frozen=True)
class Limits:
    """Caps from the serving configuration and the model artifact, applied to each request."""

    max_prompt_length: int
    """Most prompt (source) tokens."""
    max_new_tokens: int
    """Most generated tokens."""
    max_beams_x_n: int
    """Most num_beams x num_return_sequences."""
    max_running_rows: int
    """Rows of the running batch; a request never needs more."""

    def apply(self, params: generation.GenerationParams) -> int:
        """Check ``params`` against the caps; return the effective max_new_tokens."""
        n = params.max_new_tokens
        if n is None:
            n = min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens)
        check(n <= self.max_new_tokens, "max_new_tokens", f"exceeds the server's cap of {self.max_new_tokens}", n,
              limit="max_new_tokens")
        check(params.min_new_tokens <= n, "min_new_tokens", f"must not exceed max_new_tokens ({n})",
              params.min_new_tokens)
        product = params.num_beams * params.num_return_sequences
        check(product <= self.max_beams_x_n, "num_beams",
              f"x num_return_sequences ({params.num_beams} x {params.num_return_sequences}) exceeds the server's "
              f"cap max_beams_x_n={self.max_beams_x_n}", product)
        check(params.rows <= self.max_running_rows, "num_beams",
              f"needs {params.rows} batch rows, more than the server's max_running_rows={self.max_running_rows}",
              params.rows)
        return n

    def check_prompt(self, n_tokens: int, name: str = "prompt") -> None:
        check(n_tokens <= self.max_prompt_length, name,
              f"is too long: {n_tokens} tokens, more than the cap max_prompt_length={self.max_prompt_length}",
              f"{n_tokens} tokens", limit="prompt_length")


# ---- logit processors ---------------------------------------------------------------------------------------
# Logit processors (Hugging Face semantics). Built only for the features a request asks for, so the default
# decoding path runs none of this code.
#
# Each processor edits a request's block of scores ``[rows, V]`` in place, given each row's token history
# (char-LM: prompt + generated; seq2seq: generated only, as Hugging Face does for encoder-decoders) and the
# number of tokens generated so far.


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


def build_processors(params: generation.GenerationParams, eos_id: int | None) -> list[Processor]:
    """The processors ``params`` asks for; empty for the defaults."""
    out: list[Processor] = []
    if params.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        out.append(NoRepeatNGram(params.no_repeat_ngram_size))
    if params.min_new_tokens > 0 and eos_id is not None:
        out.append(MinNewTokens(params.min_new_tokens, eos_id))
    return out
