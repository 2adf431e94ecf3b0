"""Parallel text data for seq2seq: TSV files (``source<TAB>target`` per line) and padded id batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deepserve.train.config import ConfigError
from deepserve.train.data.math_problems import Example


class DataError(ConfigError):
    """A data file is missing or malformed; the message names the file and line."""


def read_tsv(path: str | Path, kind: str = "tsv") -> list[Example]:
    """Read ``source<TAB>target`` lines. Blank lines are skipped; any other line must hold exactly one tab
    with non-empty text on both sides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e}") from None
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise DataError(
                f"{path}, line {lineno}: expected 'source<TAB>target' with text on both sides "
                f"({len(parts) - 1} tab(s) found): {shown!r}"
            )
        examples.append(Example(parts[0].strip(), parts[1].strip(), kind))
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    return examples


@dataclass
class EncodedPair:
    src: list[int]
    """Source piece ids (no BOS/EOS)."""
    tgt: list[int]
    """Target piece ids (no BOS/EOS)."""


@dataclass
class Batch:
    src: torch.Tensor
    """(B,S) int64 source ids, right-padded."""
    tgt_in: torch.Tensor
    """(B,T) int64 decoder input: BOS + target, right-padded."""
    tgt_out: torch.Tensor
    """(B,T) int64 decoder target: target + EOS, right-padded (pad is ignored by the loss)."""

    def __len__(self) -> int:
        return self.src.size(0)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-pad integer rows to the longest one -> (B, max_len) int64."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def make_batch(pairs: Sequence[EncodedPair], *, pad_id: int, bos_id: int, eos_id: int, device: torch.device) -> Batch:
    """Shift targets for teacher forcing: input ``[BOS] + y``, prediction ``y + [EOS]``."""
    src = pad_rows([p.src for p in pairs], pad_id)
    tgt_in = pad_rows([[bos_id, *p.tgt] for p in pairs], pad_id)
    tgt_out = pad_rows([[*p.tgt, eos_id] for p in pairs], pad_id)
    return Batch(src.to(device), tgt_in.to(device), tgt_out.to(device))


def batches(
    pairs: Sequence[EncodedPair],
    batch_size: int,
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    device: torch.device,
    shuffle_seed: int | None = None,
) -> Iterator[Batch]:
    """Batches in order, or shuffled by ``shuffle_seed`` (deterministic per seed)."""
    order = list(range(len(pairs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        yield make_batch(chunk, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, device=device)
