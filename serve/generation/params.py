"""Request parameters for text generation, as the server applies them.

The parameters themselves, their bounds and their meaning are declared once, in ``deepserve.generation`` (the
contract the SDK shares). Here they fail as HTTP 400s: an ``InvalidParameter`` carries the parameter's name and
value as data (the OpenAI error's ``param`` comes from it), and ``Limits`` adds the server's caps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepserve import generation
from deepserve.generation import MAX_LOGPROBS, ParameterError  # noqa: F401  (re-exported)
from deepserve.serve.errors import BadRequest

DEFAULT_MAX_NEW_TOKENS = 64
"""Used when a request does not say; lowered to the server's cap when that is smaller."""


class InvalidParameter(BadRequest):
    """A 400 naming one request parameter: ``parameter`` and ``value`` are data, the message says why."""

    def __init__(self, error: ParameterError) -> None:
        super().__init__(error.message)
        self.error = error

    @property
    def parameter(self) -> str:
        return self.error.parameter

    @classmethod
    def of(cls, parameter: str, reason: str, value: Any) -> InvalidParameter:
        return cls(ParameterError(parameter, reason, value))


def check(condition: bool, name: str, message: str, value: Any) -> None:
    """Raise ``InvalidParameter('<name> <message>, got <value>')`` unless ``condition``."""
    if not condition:
        raise InvalidParameter.of(name, message, value)


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
        check(n <= self.max_new_tokens, "max_new_tokens", f"exceeds the server's cap of {self.max_new_tokens}", n)
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
              f"{n_tokens} tokens")
