"""SentencePiece tokenizer for seq2seq: trained in memory on the training texts, stored as model-file bytes.

Ids are fixed for every model type: pad=0, unk=1, bos=2, eos=3 (docs/ARCHITECTURE.md). The model file's bytes
go into the checkpoint (``data["spm_model"]``) and later into the exported artifact, so the server tokenizes
exactly as training did.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Literal

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TokenizerType = Literal["bpe", "unigram", "char"]
TOKENIZER_TYPES: tuple[str, ...] = ("bpe", "unigram", "char")


class TokenizerError(ValueError):
    """The tokenizer cannot be trained or loaded (message says why)."""


def train_tokenizer(
    texts: Iterable[str],
    *,
    model_type: TokenizerType = "bpe",
    vocab_size: int = 256,
    split_digits: bool = True,
    character_coverage: float = 1.0,
) -> bytes:
    """Train a SentencePiece model on ``texts`` and return the model file's bytes.

    ``vocab_size`` is an upper bound: on small corpora (and always for ``char``) the vocabulary is whatever
    the data supports. ``split_digits`` keeps every digit a piece of its own, which arithmetic needs.
    Normalisation is the identity so that decoded answers are the exact strings (no NFKC rewriting).
    """
    if model_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"tokenizer type must be one of {list(TOKENIZER_TYPES)}, got {model_type!r}")
    sentences = [t for t in texts if t]
    if not sentences:
        raise TokenizerError("cannot train a tokenizer on no text")
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora: take the vocabulary the data supports
            character_coverage=character_coverage,
            split_digits=split_digits,
            normalization_rule_name="identity",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,  # deterministic and polite on a shared machine
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"SentencePiece training failed ({model_type}, vocab_size={vocab_size}): {e}") from None
    return writer.getvalue()


class Tokenizer:
    """Encode/decode with a SentencePiece model given as bytes (as stored in checkpoints and artifacts)."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
        except RuntimeError as e:
            raise TokenizerError(f"not a SentencePiece model: {e}") from None
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise TokenizerError(f"SentencePiece model has special ids (pad, unk, bos, eos) = {ids}, expected (0, 1, 2, 3)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids, without BOS/EOS."""
        return list(self.sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        """Piece ids -> text; special ids (pad/bos/eos) are dropped."""
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])

    def pieces(self, text: str) -> list[str]:
        return list(self.sp.encode(text, out_type=str))
