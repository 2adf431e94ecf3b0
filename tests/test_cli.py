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


def test_defaults_reexport_an_artifact_this_version_cannot_serve(tmp_path: Path, capsys) -> None:
    import argparse
    import json

    from deepserve import defaults
    from tests.artifacts import make_seq2seq_checkpoint

    checkpoints, repository = tmp_path / "checkpoints", tmp_path / "repo"
    checkpoints.mkdir()
    checkpoint = make_seq2seq_checkpoint(checkpoints / "seq2seq-math.pt")
    from deepserve.export import export_checkpoint

    old = export_checkpoint(checkpoint, repository=repository, name="seq2seq-math", version=1,
                            formats=("onnx",), quantize=False, log=lambda _: None)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["model"]["kv_layout"] = "per-layer"  # as an export before the shared-cross layout wrote it
    (old / "manifest.json").write_text(json.dumps(manifest))
    args = argparse.Namespace(checkpoints=checkpoints, repository=repository, only=["seq2seq-math"])

    assert defaults.run(args) == 0
    out = capsys.readouterr().out
    assert "cannot be served (its seq2seq graphs use kv_layout 'per-layer'" in out
    assert (repository / "seq2seq-math" / "2" / "manifest.json").is_file() and old.is_dir()
    assert defaults.outdated_reason(repository, "seq2seq-math") is None
    assert defaults.run(args) == 0  # warm: the new version is kept, nothing retrained or re-exported
    assert "nothing to do" in capsys.readouterr().out
    assert not (repository / "seq2seq-math" / "3").exists()
