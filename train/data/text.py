"""Character-level text corpora, the character vocabulary and truncated-BPTT batching.

Corpora (``data.source``):
- ``pydoc``: the English help text shipped with Python (``pydoc_data.topics.topics``, values joined in sorted
  key order); always available offline, the default.
- ``tiny-shakespeare``: Karpathy's char-rnn corpus, downloaded and cached when online, or read from
  ``data.path``.
- ``file``: any UTF-8 text file at ``data.path``.

Batching: the encoded corpus is cut into ``batch_size`` contiguous streams; batch ``i`` holds window ``i``
(``seq_len`` characters) of every stream, so row ``b`` of batch ``i + 1`` continues row ``b`` of batch ``i``
and the recurrent state can be carried from one batch to the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from deepserve.train.config import check
from deepserve.train.data.download import DataError, default_data_root, fetch

UNK = "<unk>"
UNK_ID = 0

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"


@dataclass
class TextDataConfig:
    """Which text to train on and how to cut it into training windows."""

    source: Literal["pydoc", "tiny-shakespeare", "file"] = "pydoc"
    """Corpus: ``pydoc`` (offline, built into Python), ``tiny-shakespeare`` (downloaded) or ``file``."""
    path: str = ""
    """UTF-8 text file; required for ``file``, optional for ``tiny-shakespeare`` (use this local copy)."""
    data_dir: str = ""
    """Folder receiving the downloaded tiny-shakespeare; empty: ``$DEEPSERVE_DATA/tiny-shakespeare``
    (default ``~/.cache/deepserve/datasets/tiny-shakespeare``)."""
    seq_len: int = 64
    """Characters per training window (truncated-BPTT length)."""
    val_fraction: float = 0.1
    """Fraction of the corpus, taken from its end, used for validation."""

    def __post_init__(self) -> None:
        check(self.source in ("pydoc", "tiny-shakespeare", "file"), "source",
              "must be pydoc, tiny-shakespeare or file", self.source)
        if self.source == "file":
            check(bool(self.path), "path", "is required when data.source is 'file'", self.path)
        check(self.seq_len >= 1, "seq_len", "must be >= 1", self.seq_len)
        check(0.0 < self.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)", self.val_fraction)


# ---------------------------------------------------------------------------------------------- corpora


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file; a missing, unreadable, non-UTF-8 or empty file is a ``DataError``."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"text file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"text file {path} is a directory, expected a UTF-8 text file") from None
    except OSError as e:
        raise DataError(f"text file {path} cannot be read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path} is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not text:
        raise DataError(f"text file {path} is empty")
    return text


def pydoc_corpus() -> str:
    """The English text of Python's ``pydoc_data.topics`` (about 465k characters)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def shakespeare_corpus(path: str, data_dir: str | Path = "") -> str:
    """tiny-shakespeare from ``path`` if given, else downloaded (sha256-checked) into ``data_dir``
    (empty: the dataset cache of ``deepserve.train.data.download``)."""
    if path:
        return read_text_file(path)
    folder = Path(data_dir).expanduser() if data_dir else default_data_root() / "tiny-shakespeare"
    try:
        file = fetch(SHAKESPEARE_URL, SHAKESPEARE_SHA256, folder, SHAKESPEARE_FILENAME)
    except DataError as e:  # offline or failed download: the message says where to put the file by hand
        raise DataError(f"tiny-shakespeare: {e}; or set data.path=/path/to/input.txt") from None
    return read_text_file(file)


def load_corpus(config: TextDataConfig) -> str:
    if config.source == "pydoc":
        return pydoc_corpus()
    if config.source == "tiny-shakespeare":
        return shakespeare_corpus(config.path, config.data_dir)
    return read_text_file(config.path)  # non-empty: checked by TextDataConfig


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split by position: the last ``val_fraction`` of the characters is validation."""
    n_val = int(len(text) * val_fraction)
    if n_val < 2 or len(text) - n_val < 2:
        raise DataError(
            f"corpus of {len(text)} characters is too short for a train/validation split "
            f"with data.val_fraction={val_fraction}"
        )
    return text[: len(text) - n_val], text[len(text) - n_val :]


# ---------------------------------------------------------------------------------------------- vocabulary


class CharVocab:
    """Characters <-> ids; id 0 is ``<unk>``, the rest are the sorted characters of the training text."""

    def __init__(self, itos: list[str]) -> None:
        if not itos or itos[0] != UNK:
            raise DataError(f"vocabulary must start with {UNK!r}, got {itos[:1]!r}")
        bad = [s for s in itos[1:] if len(s) != 1]
        if bad:
            raise DataError(f"vocabulary entries after {UNK!r} must be single characters, got {bad[0]!r}")
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos) if i != UNK_ID}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls([UNK, *sorted(set(text))])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        """``(N,)`` int64 ids; characters outside the vocabulary map to ``<unk>`` (0)."""
        get = self.stoi.get
        return torch.tensor([get(ch, UNK_ID) for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Inverse of ``encode``; ``<unk>`` is rendered as U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join("\ufffd" if i == UNK_ID else self.itos[i] for i in ids)


# ---------------------------------------------------------------------------------------------- batching


class StreamBatches:
    """Truncated-BPTT windows over ``batch_size`` contiguous streams of an encoded corpus.

    ``ids`` ``(N,)`` is cut into ``batch_size`` streams of ``L = (N - 1) // batch_size`` characters (the
    remainder is dropped); window ``i`` is columns ``[i*seq_len, (i+1)*seq_len)`` of every stream, the last
    window possibly shorter. Targets are the inputs shifted by one character.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int) -> None:
        stream_len = (ids.numel() - 1) // batch_size
        if stream_len < 1:
            raise DataError(
                f"{ids.numel()} characters are too few for train.batch_size={batch_size} streams; "
                "use a smaller batch size or a longer text"
            )
        n = batch_size * stream_len
        self.inputs = ids[:n].view(batch_size, stream_len)  # (B, L)
        self.targets = ids[1 : n + 1].view(batch_size, stream_len)  # (B, L)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return -(-self.inputs.shape[1] // self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.inputs.shape[1], self.seq_len):
            end = start + self.seq_len
            yield self.inputs[:, start:end], self.targets[:, start:end]  # (B, T), (B, T)
