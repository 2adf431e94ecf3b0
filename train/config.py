"""Typed configuration: dataclasses with a docstring per field, built from YAML plus ``key=value`` overrides.

Every config dataclass validates itself in ``__post_init__`` and raises ``ConfigError`` naming the field and
the bad value. ``build_config`` turns nested dicts into nested dataclasses, rejecting unknown keys and values
of the wrong type by their dotted path (``train.lr``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def check(condition: bool, field_name: str, message: str, value: Any) -> None:
    """Raise ``ConfigError('<field> <message>, got <value>')`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{field_name} {message}, got {value!r}")


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return build_config(annotation, value, prefix=path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, got {value!r}")
    return value


def build_config(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, checking names and types; validation errors keep the
    dotted path of the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    defaults = _section_defaults(cls)
    kwargs = {}
    for name, value in raw.items():
        if name in defaults and isinstance(value, dict):
            # A partial section overrides the family's defaults for that section instead of replacing them.
            value = _deep_merge(defaults[name], value)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}.{e}") from None
        raise


def _section_defaults(cls: type) -> dict[str, dict[str, Any]]:
    """Default values of the dataclass-typed fields of ``cls``, as plain dicts."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            continue
        if dataclasses.is_dataclass(default):
            out[f.name] = dataclasses.asdict(default)
    return out


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override must look like key.path=value, got {text!r}")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class TrainConfig:
    """Settings of the generic training loop, shared by every task."""

    epochs: int = 10
    """Maximum passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit)."""
    max_time_s: float = 0.0
    """Stop after this many seconds of training (0: no limit)."""
    batch_size: int = 64
    """Examples (or sequences) per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_steps: int = 50
    """Linear warmup steps before cosine decay."""
    min_lr_ratio: float = 0.05
    """Cosine decay floor as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: off)."""
    eval_every: int = 0
    """Evaluate every N steps (0: once per epoch)."""
    patience: int = 5
    """Early stopping: evaluations without validation improvement before stopping (0: off)."""
    seed: int = 0
    """Seed for Python, NumPy and torch."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks CUDA when available."""
    amp: bool = True
    """Mixed precision (bf16/fp16 autocast) when training on CUDA; ignored on CPU."""
    num_threads: int = 0
    """torch intra-op threads on CPU (0: torch default)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<out>/tb``."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        check(self.max_steps >= 0, "max_steps", "must be >= 0", self.max_steps)
        check(self.max_time_s >= 0, "max_time_s", "must be >= 0", self.max_time_s)
        check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        check(self.lr > 0, "lr", "must be > 0", self.lr)
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0", self.grad_clip)
        check(self.eval_every >= 0, "eval_every", "must be >= 0", self.eval_every)
        check(self.patience >= 0, "patience", "must be >= 0", self.patience)
        check(self.num_threads >= 0, "num_threads", "must be >= 0", self.num_threads)


__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "check",
    "field",
    "load_yaml",
    "parse_override",
    "to_dict",
]
