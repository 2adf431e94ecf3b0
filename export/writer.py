"""Writing ``<repository>/<name>/<version>/`` atomically: everything goes into a hidden temporary directory
beside the target, which is renamed into place only once complete. On any failure the temporary directory
(and a model directory this export created) is removed, so nothing half-written is ever visible."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepserve.export.errors import ExportError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExportError(
            f"--name {name!r} is not a valid model name (letters, digits, '.', '_', '-'; starting with a letter or digit)"
        )


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(model_dir: Path, version: int | None, overwrite: bool) -> int:
    """The version to write: ``version`` if free (or ``overwrite``), else the next free integer."""
    if version is None:
        return max(existing_versions(model_dir), default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"--version must be a positive integer, got {version!r}")
    if (model_dir / str(version)).exists() and not overwrite:
        raise ExportError(f"{model_dir / str(version)} already exists; pass --overwrite to replace it")
    return version


def check_repository(repository: Path) -> None:
    """The repository must be (or become) a writable directory."""
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"--repository {repository} exists and is not a directory")
    for parent in [repository, *repository.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--repository {repository}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ExportError(f"--repository {repository} is not writable ({parent} denies write access)")
            return


@contextmanager
def staging(repository: Path, name: str, version: int, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit move it to ``repository/name/version``."""
    model_dir = repository / name
    created = [p for p in (repository, model_dir) if not p.exists()]
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=model_dir))
    except OSError as e:
        _remove_created(created)
        raise ExportError(f"--repository {repository} is not writable: {e.strerror or e}") from None
    try:
        yield tmp
        final = model_dir / str(version)
        if final.exists():
            if not overwrite:  # appeared while we were exporting
                raise ExportError(f"{final} already exists; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{version}.old-", dir=model_dir))
            os.replace(final, old / "v")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: list[Path]) -> None:
    """Remove directories this export created, deepest first, if they are still empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass  # not empty (another export wrote there meanwhile) or already gone: leave it
