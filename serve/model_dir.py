"""A one-model repository view: what KServe mounts (``--model-dir /mnt/models --model-name NAME``) and what a
Ray replica serves (one model of a repository), laid out as ``<view>/<name>/...`` for ``ModelRepository``.

The view is a temporary directory holding one symlink, so nothing is copied and the artifact is verified
where it lies. Two layouts are accepted for the model directory:

- an artifact version: ``manifest.json`` directly inside (KServe's ``storageUri`` pointing at
  ``<repository>/<model>/<version>``); it becomes ``<view>/<name>/<version>``;
- a model folder: numbered version folders (and optionally ``config.json``) inside (``storageUri`` pointing at
  ``<repository>/<model>``); it becomes ``<view>/<name>``.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelDirError(ValueError):
    """The model directory or name cannot be served; the message names the flag and the problem."""


def _artifact_version(model_dir: Path) -> int:
    try:
        version = json.loads((model_dir / "manifest.json").read_text()).get("version")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelDirError(f"--model-dir {model_dir}: manifest.json is not readable JSON ({e})") from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelDirError(f"--model-dir {model_dir}: manifest.json has no positive integer version, "
                            f"got {version!r}")
    return version


def single_model_view(model_dir: Path | str, name: str, *, allow_symlinks_out: bool = False,
                      parent: Path | str | None = None) -> Path:
    """A repository directory serving ``model_dir`` as model ``name``; removed when the process exits.

    The view's own symlink points out of it, so its repository must allow that (``ArtifactTrust``); what
    the repository would refuse in ``model_dir`` itself, version folders that are symlinks out of it, is refused
    here unless ``allow_symlinks_out``."""
    model_dir = Path(model_dir).resolve()
    if not _NAME.match(name):
        raise ModelDirError(f"--model-name must be letters, digits, '.', '_' or '-', got {name!r}")
    if not model_dir.is_dir():
        raise ModelDirError(f"--model-dir {model_dir} is not a directory")
    view = Path(tempfile.mkdtemp(prefix="deepserve-view-", dir=parent))
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    if (model_dir / "manifest.json").is_file():
        (view / name).mkdir()
        (view / name / str(_artifact_version(model_dir))).symlink_to(model_dir, target_is_directory=True)
    elif any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()):
        for version in model_dir.iterdir():
            if version.name.isdigit() and not allow_symlinks_out and not version.resolve().is_relative_to(model_dir):
                raise ModelDirError(f"--model-dir {model_dir}: version folder {version.name} is a symlink out of "
                                    f"it; refused (--allow-symlinks-out serves it)")
        (view / name).symlink_to(model_dir, target_is_directory=True)
    else:
        raise ModelDirError(f"--model-dir {model_dir} holds neither manifest.json (an artifact version) nor "
                            f"numbered version folders (a model folder)")
    return view
