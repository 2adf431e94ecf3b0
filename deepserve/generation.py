"""The generation parameters: one declaration of every parameter, its bounds and its meaning.

The server validates requests with it (``deepserve.serve.generation``), derives its request schemas and OpenAPI
document from ``parameters_schema``, and the SDK (``deepserve.clients``) checks its ``GenerateParams`` against the
same bounds before sending. Like ``manifest.py`` it imports nothing but the standard library.

A bad value raises ``ParameterError`` naming the parameter and the value as data (``error.parameter``,
``error.value``) and in its message: ``top_p must be a number in (0, 1], got 1.5``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_LOGPROBS = 5
"""Most alternatives per position that ``logprobs`` may ask for (as the OpenAI API)."""
MAX_STOP_STRINGS = 16


class ParameterError(ValueError):
    """A generation parameter with a value it cannot take."""

    def __init__(self, parameter: str, reason: str, value: Any, *, message: str | None = None) -> None:
        self.parameter, self.reason, self.value = parameter, reason, value
        self.message = message or f"{parameter} {reason}, got {value!r}"
        super().__init__(self.message)

    def renamed(self, parameter: str) -> ParameterError:
        """The same error under another name for the parameter (an API that calls it differently)."""
        return ParameterError(parameter, self.reason, self.value)


def check(condition: bool, name: str, message: str, value: Any) -> None:
    """Raise ``ParameterError(name, message, value)`` unless ``condition``."""
    if not condition:
        raise ParameterError(name, message, value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (JSON's NaN / Infinity extensions parse to floats no bound may accept)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _param(default: Any, doc: str, kind: str | None = None, *, nullable: bool = False, **bounds: float) -> Any:
    """A dataclass field whose metadata holds its description, kind (``integer`` / ``number``) and bounds
    (``ge``, ``gt``, ``le``, as JSON schema's minimum / exclusiveMinimum / maximum)."""
    return field(default=default, metadata={"doc": doc, "kind": kind, "nullable": nullable, "bounds": bounds})


_WORDS = {"ge": ">=", "gt": ">", "le": "<="}
_SCHEMA_KEYS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _bounds_text(kind: str, bounds: dict[str, float]) -> str:
    name = "an integer" if kind == "integer" else "a number"
    if len(bounds) == 2:
        lo = "ge" if "ge" in bounds else "gt"
        return f"must be {name} in {'[' if lo == 'ge' else '('}{_num(bounds[lo])}, {_num(bounds['le'])}]"
    return " ".join([f"must be {name}"] + [f"{_WORDS[k]} {_num(v)}" for k, v in bounds.items()])


def _check_declared(obj: Any) -> None:
    """Check every field that declares a kind against its bounds (the message only for a failure: this runs
    once per request)."""
    for f in dataclasses.fields(obj):
        kind, bounds = f.metadata.get("kind"), f.metadata.get("bounds", {})
        value = getattr(obj, f.name)
        if kind is None or (value is None and f.metadata.get("nullable")):
            continue
        ok = _is_int(value) if kind == "integer" else _is_number(value)
        if not (ok and all(value >= b if k == "ge" else value > b if k == "gt" else value <= b
                           for k, b in bounds.items())):
            raise ParameterError(f.name, _bounds_text(kind, bounds), value)


@dataclass(kw_only=True)
class GenerationParams:
    """How to decode one request. Sampling when ``temperature > 0`` (and ``num_beams == 1``), greedy when
    ``temperature == 0``, beam search when ``num_beams > 1`` (deterministic: temperature, top_k, top_p and
    seed are then not used). Defaults are the same whether a request carries an empty parameters object or
    none at all."""

    max_new_tokens: int | None = _param(None, "Most tokens to generate; null: 64, or the server's max_new_tokens "
                                              "cap when that is lower.", "integer", nullable=True, ge=1)
    min_new_tokens: int = _param(0, "EOS is forbidden, and stop strings are ignored, before this many tokens.",
                                 "integer", ge=0)
    temperature: float = _param(1.0, "Softmax temperature for sampling; 0 means greedy decoding.", "number",
                                ge=0, le=100)
    top_k: int = _param(0, "Sample among the k most likely tokens only; 0 disables.", "integer", ge=0)
    top_p: float = _param(1.0, "Nucleus sampling: the smallest set of tokens whose probability reaches top_p.",
                          "number", gt=0, le=1)
    repetition_penalty: float = _param(1.0, "CTRL-style penalty (> 1 discourages) on tokens already in the "
                                            "sequence; 1 disables.", "number", gt=0)
    no_repeat_ngram_size: int = _param(0, "Forbid repeating any n-gram of this size; 0 disables.", "integer", ge=0)
    seed: int | None = _param(None, "Seed of this request's own random generator (sampling); null draws a fresh "
                                    "one.", "integer", nullable=True, ge=0, le=2**63 - 1)
    stop: list[str] | str = _param(None, f"Generation ends (finish reason stop) before the first occurrence of any "
                                         f"of these strings (at most {MAX_STOP_STRINGS}).")
    num_beams: int = _param(1, "Beam width; > 1 selects beam search.", "integer", ge=1)
    length_penalty: float = _param(1.0, "Beam score = sum of log-probs / generated_length ** length_penalty.",
                                   "number", ge=-10, le=10)
    early_stopping: bool | Literal["never"] = _param(False, "Beam search stop rule (Hugging Face): true stops once "
                                                            "num_beams hypotheses are finished; false when no live "
                                                            "beam can still beat them by a heuristic; \"never\" when "
                                                            "none can under the best-case bound.")
    num_return_sequences: int = _param(1, "Sequences to return: independent samples, or the n best beam "
                                          "hypotheses (n <= num_beams).", "integer", ge=1)
    logprobs: int | bool | None = _param(None, f"Return each generated token's log-probability plus this many most "
                                               f"likely alternatives (0-{MAX_LOGPROBS}; true: 0); null: off. Every "
                                               f"strategy reports the model's own distribution: before "
                                               f"temperature, top-k/top-p and the logit processors (repetition "
                                               f"penalty, no-repeat n-gram, min_new_tokens), as the OpenAI API "
                                               f"does.")

    def __post_init__(self) -> None:
        _check_declared(self)
        if self.max_new_tokens is not None:
            check(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                  f"must not exceed max_new_tokens ({self.max_new_tokens})", self.min_new_tokens)
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        check(isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)
              and len(stop) <= MAX_STOP_STRINGS, "stop",
              f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings", self.stop)
        self.stop = list(stop)
        check(self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
              "early_stopping", 'must be true, false or "never"', self.early_stopping)
        if self.num_beams > 1:
            check(self.num_return_sequences <= self.num_beams, "num_return_sequences",
                  f"must not exceed num_beams ({self.num_beams}) for beam search", self.num_return_sequences)
        elif self.temperature == 0.0:
            check(self.num_return_sequences == 1, "num_return_sequences",
                  "must be 1 for greedy decoding (temperature 0); sample or use num_beams", self.num_return_sequences)
        if isinstance(self.logprobs, bool):  # the Triton-style switch: true is the chosen token only
            self.logprobs = 0 if self.logprobs else None
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
        """Build from a JSON object; unknown keys are a ``ParameterError`` naming them."""
        if raw is None:
            return cls()
        check(isinstance(raw, dict), where, "must be an object", raw)
        names = FIELD_NAMES
        if not names.issuperset(raw):
            unknown = sorted(set(raw) - names)
            raise ParameterError(unknown[0], "is not a generation parameter", raw[unknown[0]],
                                 message=f"{where}: unknown parameter(s) {unknown}; known: {sorted(names)}")
        # JSON has one number type: 16.0 is an integer to JSON Schema (and to the OpenAPI document), so here too
        return cls(**{k: int(v) if k in INTEGER_FIELDS and isinstance(v, float) and v.is_integer() else v
                      for k, v in raw.items()})

    def changed(self) -> dict[str, Any]:
        """The parameters that differ from their defaults, as JSON values (what a client needs to send)."""
        default = _DEFAULTS
        return {name: getattr(self, name) for name in FIELD_NAMES if getattr(self, name) != getattr(default, name)}


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GenerationParams))
INTEGER_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationParams) if f.metadata.get("kind") == "integer")
_DEFAULTS = GenerationParams()

_TYPES = {"integer": {"type": "integer"}, "number": {"type": "number"}}
_SPECIAL = {
    "stop": {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
                       {"type": "null"}]},
    "early_stopping": {"anyOf": [{"type": "boolean"}, {"const": "never"}]},
    "logprobs": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
                           {"type": "null"}]},
}


def parameter_schema(name: str) -> dict[str, Any]:
    """The JSON schema of parameter ``name``: type, bounds, default and description, from its declaration."""
    f = GenerationParams.__dataclass_fields__[name]
    meta = f.metadata
    schema = dict(_SPECIAL.get(name) or _TYPES[meta["kind"]])
    schema.update({_SCHEMA_KEYS[k]: v for k, v in meta["bounds"].items()})
    if meta["nullable"]:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "default": f.default, "description": meta["doc"]}


def parameters_schema() -> dict[str, Any]:
    """The JSON schema of a ``parameters`` object (unknown keys refused)."""
    return {"type": "object", "additionalProperties": False,
            "properties": {f.name: parameter_schema(f.name) for f in dataclasses.fields(GenerationParams)}}
