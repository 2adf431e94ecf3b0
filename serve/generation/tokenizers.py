"""Tokenizers for generation, read from the artifact (never from training code).

- ``CharTokenizer``: ``vocab.json``, index 0 ``<unk>`` and one character per other entry; any character
  outside the vocabulary (including U+FFFD standing for invalid UTF-8) becomes ``unk``.
- ``SentencePieceTokenizer``: ``tokenizer.model``; pieces SentencePiece cannot cover map to its ``unk``.

``decode`` of a prefix of a sequence is a prefix of ``decode`` of the whole sequence (SentencePiece only strips
the first piece's leading space), except for a trailing U+FFFD from half a byte-fallback character: streaming
holds that one back (``stable_text``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from deepserve.manifest import Manifest, ManifestError


def clean_text(text: str) -> str:
    """Replace lone surrogates (JSON ``"\\ud800"``), which are not encodable text, by U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text


class Tokenizer(Protocol):
    vocab_size: int
    unk_id: int
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...  # the text of one token, for logprobs listings


class CharTokenizer:
    """One id per character; ``vocab[0]`` is ``<unk>``."""

    def __init__(self, vocab: list[str], unk_id: int = 0) -> None:
        self.vocab = list(vocab)
        self.vocab_size = len(self.vocab)
        self.unk_id = unk_id
        self.eos_id = self.bos_id = self.pad_id = None
        self.index = {ch: i for i, ch in enumerate(self.vocab) if i != unk_id}
        # decoded text of each id: unk decodes to nothing rather than to the literal "<unk>"
        self.pieces = ["" if i == unk_id else ch for i, ch in enumerate(self.vocab)]

    @classmethod
    def from_file(cls, path: Path, special_ids: dict[str, Any] | None = None) -> CharTokenizer:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ManifestError(f"{path}: cannot read the character vocabulary ({e})") from None
        unk = int((special_ids or {}).get("unk", 0))
        if isinstance(raw, dict) and isinstance(raw.get("vocab"), list):
            unk = int(raw.get("unk_id", unk))
            raw = raw["vocab"]
        elif isinstance(raw, dict) and all(isinstance(v, int) for v in raw.values()):
            vocab = [""] * len(raw)  # {char: id}
            for ch, i in raw.items():
                vocab[i] = ch
            raw = vocab
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw) or not raw:
            raise ManifestError(f"{path}: expected a list of characters (or {{\"vocab\": [...]}})")
        return cls(raw, unk)

    def encode(self, text: str) -> list[int]:
        get, unk = self.index.get, self.unk_id
        return [get(ch, unk) for ch in clean_text(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(self.pieces.__getitem__, ids))

    def token_text(self, token_id: int) -> str:
        return self.pieces[token_id]


class SentencePieceTokenizer:
    """A SentencePiece model with the pad/unk/bos/eos ids of the manifest."""

    def __init__(self, path: Path, special_ids: dict[str, Any]) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ManifestError(f"{path}: cannot load the SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id = int(special_ids.get("unk", self.sp.unk_id()))
        self.eos_id = int(special_ids.get("eos", self.sp.eos_id()))
        self.bos_id = int(special_ids.get("bos", self.sp.bos_id()))
        self.pad_id = int(special_ids.get("pad", max(self.sp.pad_id(), 0)))
        self._special = {self.eos_id, self.bos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(clean_text(text), out_type=int)

    def decode(self, ids: list[int]) -> str:
        special = self._special
        return self.sp.decode([i for i in ids if i not in special])

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id).replace("\u2581", " ")


def stable_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The decoded text of ``ids`` that more tokens cannot change (streaming and stop-string checks)."""
    text = tokenizer.decode(ids)
    if not isinstance(tokenizer, CharTokenizer) and text.endswith("\ufffd"):
        return text[:-1]
    return text


def load_tokenizer(manifest: Manifest, directory: Path) -> CharTokenizer | SentencePieceTokenizer:
    spec = manifest.tokenizer
    path = Path(directory) / spec["file"]
    special = dict(spec.get("special_ids") or {})
    if spec["type"] == "char":
        return CharTokenizer.from_file(path, special)
    if spec["type"] == "sentencepiece":
        return SentencePieceTokenizer(path, special)
    raise ManifestError(f"tokenizer.type must be char or sentencepiece, got {spec['type']!r}")
