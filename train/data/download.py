"""Download a file once, check its SHA-256, keep it in a cache directory.

Every dataset loader of every family goes through ``fetch``: a file already in the cache with the right hash is
used as is; otherwise it is downloaded to a temporary file, hashed, and renamed into place only when the hash
matches. When the download cannot happen (no network, ``DEEPSERVE_OFFLINE=1``), the error says exactly which
file to put where by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from deepserve.train.config import ConfigError

OFFLINE_ENV = "DEEPSERVE_OFFLINE"
"""Set to 1 to never touch the network (missing files then fail at once with the by-hand instructions)."""
DATA_ENV = "DEEPSERVE_DATA"
"""Root of the default dataset cache (default ``~/.cache/deepserve/datasets``)."""


class DataError(ConfigError):
    """A dataset file is missing, corrupt, or cannot be downloaded; the message says which file and what to do.
    A ``ConfigError`` so that the CLI reports it as a user error (the config points at data that is not there)."""


def default_data_root() -> Path:
    """``$DEEPSERVE_DATA`` or ``~/.cache/deepserve/datasets``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "deepserve" / "datasets").expanduser()


def offline() -> bool:
    """True when ``DEEPSERVE_OFFLINE`` asks for no network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand(url: str, sha256: str, dest: Path) -> str:
    return f"download {url} yourself and put it at {dest} (expected sha256 {sha256})"


def fetch(url: str, sha256: str, cache_dir: str | Path, filename: str, *, timeout: float = 60.0) -> Path:
    """Return ``cache_dir/filename``, downloading it from ``url`` first unless a copy with hash ``sha256``
    is already there. Raises ``DataError`` (saying where to put the file by hand) when offline or on failure."""
    dest = Path(cache_dir).expanduser() / filename
    sha256 = sha256.lower()
    stale = ""
    if dest.is_file():
        actual = sha256_file(dest)
        if actual == sha256:
            return dest
        stale = f"{dest} exists but its sha256 is {actual}, not {sha256}; "
    if offline():
        raise DataError(f"{stale}{filename} is not available offline ({OFFLINE_ENV} is set): {_by_hand(url, sha256, dest)}")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "deepserve"})
    except ValueError as e:
        raise DataError(f"bad download URL {url!r} ({e}); {_by_hand(url, sha256, dest)}") from None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache directory {dest.parent}: {e}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = sha256_file(tmp)
        if actual != sha256:
            raise DataError(
                f"downloaded {url} but its sha256 is {actual}, not {sha256} (corrupt or changed upstream); "
                + _by_hand(url, sha256, dest)
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"{stale}could not download {url} ({reason}); {_by_hand(url, sha256, dest)}") from None
    finally:
        tmp.unlink(missing_ok=True)  # no-op once renamed into place
    return dest
