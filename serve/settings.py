"""Per-model serving settings.

Resolved in three layers, later wins: the dataclass defaults, an optional ``<repository>/<model>/config.json``
(or ``config.yaml``) beside the version folders, then overrides from the environment
(``DEEPSERVE_MAX_BATCH_SIZE=8``) and from CLI flags. Serve must not import training code, so this module
carries its own small ``check`` instead of ``deepserve.train.config.check``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from deepserve.serve.model_state import VersionPolicy

CONFIG_FILES = ("config.json", "config.yaml", "config.yml")
ENV_PREFIX = "DEEPSERVE_"
ENGINE_SECTIONS = ("ray",)
"""Config-file sections read by a scale-out engine (``serve/ray_app.py``), not by ``ModelSettings``."""


class SettingsError(ValueError):
    """A serving setting is invalid; the message names the field (and file) and the bad value."""


def check(condition: bool, field_name: str, message: str, value: Any) -> None:
    """Raise ``SettingsError('<field> <message>, got <value>')`` unless ``condition``."""
    if not condition:
        raise SettingsError(f"{field_name} {message}, got {value!r}")


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served. Every field can be set per model in its config file."""

    max_batch_size: int = 32
    """Most rows one batch may hold; a request with more rows than this runs alone, split into batches."""
    max_queue_delay_ms: float = 2.0
    """How long the batcher waits for more requests after the first one of a batch arrived."""
    max_queue_size: int = 1024
    """Requests that may wait per model instance; beyond it requests are refused with 429 + Retry-After."""
    max_queue_wait_ms: float | None = None
    """Requests predicted (rows ahead x recent time per row) to wait longer than this in a batcher's queue are
    refused at once with 429 + Retry-After; 0 turns the bound off (the deadline still applies: a request
    predicted to finish past its deadline is refused the same way). None (the default) adapts it to the model:
    1.5 rows' worth of the recent time per row, at least 15 ms (``batcher.AUTO_WAIT_FLOOR_MS``)."""
    request_timeout_s: float = 30.0
    """Deadline for a request that brings none of its own; a request past it is answered 504."""
    inline_batch_ms: float = 0.5
    """A batch predicted (from recent batches' time per row) to run faster than this many milliseconds runs on
    the event loop instead of the instance's worker thread: for a small model the hand-off to a thread and
    back costs more than the batch. 0 sends every batch to the worker thread, as do TorchScript graphs on CPU
    (their OpenMP threads are per calling thread)."""
    instances: int = 1
    """Model instances (sessions), each with its own batcher; CPU threads are shared between them."""
    intra_op_threads: int | None = None
    """Classification models: CPU threads one instance's batch runs on (ONNX Runtime's intra-op pool, torch's
    threads); None (the default) shares the cores this process may use between its instances. Generation models'
    step graphs choose their own threads."""
    backend: str = "auto"
    """Runtime preference: auto (ONNX Runtime on CPU, TorchScript on CUDA), onnx or torchscript."""
    precision: str = "fp32"
    """Graph variant: fp32, int8 (onnx-int8) or fp16 (onnx-fp16), where the artifact has it."""
    default_version: int | None = None
    """Version answering requests that name none; None means the latest ready version."""
    max_running_rows: int = 64
    """Generation: rows (sequences x beams) decoded together in one step."""
    max_waiting: int = 256
    """Generation: requests waiting for a decoding slot before new ones are refused."""
    max_prompt_length: int = 512
    """Generation: longest prompt accepted, in tokens."""
    max_new_tokens: int = 256
    """Generation: most tokens one request may ask for."""
    max_beams_x_n: int = 16
    """Generation: cap on num_beams x n for one request."""
    version_policy: VersionPolicy = VersionPolicy()
    """Which versions are loaded: ``"all"`` (default), ``"latest N"`` or a list of versions."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "instances", "max_running_rows", "max_waiting",
                     "max_prompt_length", "max_new_tokens", "max_beams_x_n", "intra_op_threads"):
            value = getattr(self, name)
            if name == "intra_op_threads" and value is None:  # the cores shared between instances
                continue
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                  "must be an integer >= 1", value)
        for name in ("max_queue_delay_ms", "request_timeout_s", "inline_batch_ms", "max_queue_wait_ms"):
            value = getattr(self, name)
            if name == "max_queue_wait_ms" and value is None:  # adaptive
                continue
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, name,
                  "must be a number >= 0", value)
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0", self.request_timeout_s)
        check(self.backend in ("auto", "onnx", "torchscript"), "backend", "must be auto, onnx or torchscript",
              self.backend)
        check(self.precision in ("fp32", "int8", "fp16"), "precision", "must be fp32, int8 or fp16", self.precision)
        v = self.default_version
        check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), "default_version",
              "must be a positive integer or null", v)
        if not isinstance(self.version_policy, VersionPolicy):
            try:
                object.__setattr__(self, "version_policy", VersionPolicy.parse(self.version_policy))
            except ValueError as e:
                raise SettingsError(str(e)) from None

    def replace(self, **changes: Any) -> ModelSettings:
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(ModelSettings)}


def _convert(name: str, raw: Any) -> Any:
    """Coerce a value read from a string (env var, CLI) or a file into the field's type."""
    kind = FIELDS[name].type
    if raw is None:
        return None
    if name == "version_policy":
        try:
            return VersionPolicy.parse(raw)
        except ValueError as e:
            raise SettingsError(str(e)) from None
    if not isinstance(raw, str):
        if "float" in kind and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        return raw
    text = raw.strip()
    try:
        if kind == "int | None":
            if text.lower() in ("", "none", "null") or (name == "default_version" and text.lower() == "latest"):
                return None  # "latest" names a version, not a count of threads
            return int(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    return text


def read_config_file(model_dir: Path) -> dict[str, Any]:
    """The settings in ``model_dir/config.{json,yaml}``, or ``{}`` when there is none."""
    path, raw = _load_config_file(model_dir)
    if path is None:
        return {}
    # an engine's section (``ray``) is that engine's to read: read_engine_section
    return settings_mapping({k: v for k, v in raw.items() if k not in ENGINE_SECTIONS}, str(path))


def read_engine_section(model_dir: Path, section: str) -> tuple[Path | None, dict[str, Any]]:
    """The file and its ``section`` mapping (``{}`` when absent), e.g. ``"ray"``: replicas and resources."""
    path, raw = _load_config_file(model_dir)
    value = raw.get(section, {})
    if not isinstance(value, dict):
        raise SettingsError(f"{path}: {section} must be a mapping, got {type(value).__name__}")
    return path, value


def _load_config_file(model_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    for file_name in CONFIG_FILES:
        path = Path(model_dir) / file_name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                raw = json.loads(path.read_text())
            else:
                import yaml

                raw = yaml.safe_load(path.read_text()) or {}
        except Exception as e:  # any parse error is the file's fault: report it, naming the file
            raise SettingsError(f"{path}: cannot parse ({e})") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: must hold a mapping of settings, got {type(raw).__name__}")
        return path, raw
    return None, {}


def settings_mapping(raw: Any, where: str) -> dict[str, Any]:
    """Checked and converted settings from a config file's (or a load call's config override's) mapping."""
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: must hold a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise SettingsError(f"{where}: unknown settings {unknown}; known: {sorted(FIELDS)}")
    try:
        return {k: _convert(k, v) for k, v in raw.items()}
    except SettingsError as e:
        raise SettingsError(f"{where}: {e}") from None


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings given as ``DEEPSERVE_<FIELD>`` environment variables."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            try:
                out[name] = _convert(name, environ[key])
            except SettingsError as e:
                raise SettingsError(f"environment variable {key}: {e}") from None
    return out


def resolve_settings(model_dir: Path | None, overrides: Mapping[str, Any] | None = None,
                     config: Mapping[str, Any] | None = None) -> ModelSettings:
    """Defaults, then the model's config file (or ``config``, a load call's override of it), then
    ``overrides`` (env and CLI, already merged)."""
    values: dict[str, Any] = {}
    where = "settings"
    if config is not None:
        values.update(settings_mapping(dict(config), "config override"))
        where = "config override"
    elif model_dir is not None:
        values.update(read_config_file(model_dir))
        where = f"{model_dir} settings"
    for name, value in (overrides or {}).items():
        if name not in FIELDS:
            raise SettingsError(f"unknown setting {name!r}; known: {sorted(FIELDS)}")
        if value is not None:  # None = not given (an unset CLI flag)
            values[name] = _convert(name, value)
    try:
        return ModelSettings(**values)
    except SettingsError as e:
        raise SettingsError(f"{where}: {e}") from None
    except TypeError as e:
        raise SettingsError(f"{where}: {e}") from None
