"""Request parameters for text generation: one dataclass, validated field by field.

Every error is a ``BadRequest`` whose message names the field and the bad value, so a client sees
``top_p must be in (0, 1], got 1.5`` and not a traceback. Defaults are the same whether a request carries
an empty parameters object or none at all (``GenerationParams.from_dict(None) == GenerationParams()``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from deepserve.serve.errors import BadRequest, LimitExceeded

DEFAULT_MAX_NEW_TOKENS = 64
"""Used when a request does not say; lowered to the server's cap when that is smaller."""
MAX_LOGPROBS = 5
"""Most alternatives per position that ``logprobs`` may ask for (as the OpenAI API)."""


def check(condition: bool, name: str, message: str, value: Any, limit: str | None = None) -> None:
    """Raise ``BadRequest('<name> <message>, got <value>')`` unless ``condition`` (``LimitExceeded``, counted
    under ``limit``, for a server cap)."""
    if not condition:
        text = f"{name} {message}, got {value!r}"
        raise BadRequest(text) if limit is None else LimitExceeded(text, reason=limit)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class GenerationParams:
    """How to decode one request. Sampling when ``temperature > 0`` (and ``num_beams == 1``), greedy when
    ``temperature == 0``, beam search when ``num_beams > 1`` (deterministic: temperature, top_k, top_p and
    seed are then not used)."""

    max_new_tokens: int | None = None
    """Most tokens to generate; None: 64, or the server's ``max_new_tokens`` cap when that is lower."""
    min_new_tokens: int = 0
    """EOS is forbidden, and stop strings are ignored, before this many tokens were generated."""
    temperature: float = 1.0
    """Softmax temperature for sampling; 0 means greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (at least one token)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty (> 1 discourages) on tokens already in the sequence; 1 disables."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size; 0 disables."""
    seed: int | None = None
    """Seed of this request's own random generator (sampling); None draws a fresh one."""
    stop: list[str] = field(default_factory=list)
    """Generation ends (finish reason ``stop``) before the first occurrence of any of these strings."""
    num_beams: int = 1
    """Beam width; > 1 selects beam search."""
    length_penalty: float = 1.0
    """Beam score = sum of log-probs / generated_length ** length_penalty (Hugging Face semantics)."""
    early_stopping: bool | Literal["never"] = False
    """Beam search stop rule (Hugging Face): True stops once num_beams hypotheses are finished; False stops when
    no live beam can still beat them by a heuristic; "never" when none can under the best-case bound."""
    num_return_sequences: int = 1
    """Sequences to return: independent samples, or the n best beam hypotheses (needs n <= num_beams)."""
    logprobs: int | None = None
    """Return each generated token's log-probability plus this many most likely alternatives (0-5); None: off."""

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
                  "must be an integer >= 1", self.max_new_tokens)
        check(_is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens",
              "must be an integer >= 0", self.min_new_tokens)
        if self.max_new_tokens is not None:
            check(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                  f"must not exceed max_new_tokens ({self.max_new_tokens})", self.min_new_tokens)
        check(_is_number(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
              "must be a number in [0, 100]", self.temperature)
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0", self.top_k)
        check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be a number in (0, 1]", self.top_p)
        check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
              "must be a number > 0", self.repetition_penalty)
        check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
              "must be an integer >= 0", self.no_repeat_ngram_size)
        if self.seed is not None:
            check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "must be an integer in [0, 2**63)", self.seed)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop)
              and len(self.stop) <= 16, "stop", "must be a string or a list of at most 16 non-empty strings",
              self.stop)
        self.stop = list(self.stop)
        check(_is_int(self.num_beams) and self.num_beams >= 1, "num_beams", "must be an integer >= 1", self.num_beams)
        check(_is_number(self.length_penalty) and -10.0 <= self.length_penalty <= 10.0, "length_penalty",
              "must be a number in [-10, 10]", self.length_penalty)
        check(self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
              "early_stopping", 'must be true, false or "never"', self.early_stopping)
        check(_is_int(self.num_return_sequences) and self.num_return_sequences >= 1, "num_return_sequences",
              "must be an integer >= 1", self.num_return_sequences)
        if self.num_beams > 1:
            check(self.num_return_sequences <= self.num_beams, "num_return_sequences",
                  f"must not exceed num_beams ({self.num_beams}) for beam search", self.num_return_sequences)
        elif self.temperature == 0.0:
            check(self.num_return_sequences == 1, "num_return_sequences",
                  "must be 1 for greedy decoding (temperature 0); sample or use num_beams", self.num_return_sequences)
        if self.logprobs is True:  # the Triton-style boolean switch: chosen token only
            self.logprobs = 0
        elif self.logprobs is False:
            self.logprobs = None
        if self.logprobs is not None:
            check(_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                  f"must be true, false or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)

    @property
    def strategy(self) -> Literal["greedy", "sample", "beam"]:
        if self.num_beams > 1:
            return "beam"
        return "greedy" if self.temperature == 0.0 else "sample"

    @property
    def rows(self) -> int:
        """Batch rows this request occupies while it runs."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, *, where: str = "parameters") -> GenerationParams:
        """Build from a JSON object; unknown keys are a ``BadRequest`` naming them."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise BadRequest(f"{where} must be an object, got {raw!r}")
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
        if not names.issuperset(raw):
            unknown = sorted(set(raw) - names)
            raise BadRequest(f"{where}: unknown parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**raw)


_FIELD_NAMES: dict[type, frozenset[str]] = {}
"""``from_dict``: each class's field names, looked up once (``dataclasses.fields`` per request showed up in
profiles of the HTTP path)."""


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

    def apply(self, params: GenerationParams) -> int:
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
