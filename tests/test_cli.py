"""The `deepserve` command: help on every level, and one-line errors that name the flag or file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deepserve.cli import build_parser


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepserve.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_stage_registers_its_subcommands() -> None:
    assert {"train", "export", "serve", "predict", "generate", "models", "defaults"} <= set(subcommands())


@pytest.mark.parametrize("command", ["", *subcommands()])
def test_help_on_every_level(command: str) -> None:
    result = run_cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: deepserve" in result.stdout


def test_unknown_preset_names_the_flag() -> None:
    result = run_cli("train", "classifier", "--preset", "nope")
    assert result.returncode == 2
    assert "--preset 'nope' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_names_the_field() -> None:
    result = run_cli("train", "classifier", "--set", "train.lr=-1", "--print-config")
    assert result.returncode == 2
    assert "train.lr must be > 0, got -1" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    result = run_cli("train", "charlm", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml does not exist" in result.stderr


def test_print_config_resolves_preset_and_overrides() -> None:
    result = run_cli("train", "classifier", "--preset", "digits-cnn", "--set", "train.seed=7", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "seed: 7" in result.stdout
