"""Text corpora, character vocabulary and truncated-BPTT batching of the char-LM family."""

from __future__ import annotations

import pytest
import torch

from deepserve.train.config import ConfigError, build_config
from deepserve.train.data.download import DataError
from deepserve.train.data.text import (
    SHAKESPEARE_FILENAME,
    SHAKESPEARE_URL,
    UNK,
    CharVocab,
    StreamBatches,
    TextDataConfig,
    load_corpus,
    pydoc_corpus,
    read_text_file,
    split_text,
)

@pytest.fixture(autouse=True)
def _one_thread():
    # the machine's cores are shared: with more threads than free cores, OpenMP spin-waits make tiny ops ~50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NON_ASCII = "Ça déjà vu — naïve façade, Grüße, 東京, emoji 🙂.\nSecond line ✓\n"


def test_text_file_loader_reads_utf8_with_non_ascii(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(NON_ASCII * 3, encoding="utf-8")
    text = load_corpus(TextDataConfig(source="file", path=str(path)))
    assert text == NON_ASCII * 3
    assert "東" in text and "🙂" in text


def test_text_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt does not exist"):
        read_text_file(missing)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("façade".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not valid UTF-8 \(bad byte at offset 2\)"):
        read_text_file(latin1)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt is empty"):
        read_text_file(empty)
    # a DataError is a ConfigError, so the CLI reports it as a user error
    assert issubclass(DataError, ConfigError)


def test_pydoc_corpus_loads_offline():
    from pydoc_data.topics import topics

    text = load_corpus(TextDataConfig())  # the default source
    assert text == pydoc_corpus()
    assert len(text) > 100_000
    first = sorted(topics)[0]
    assert text.startswith(topics[first])
    assert "The assert statement" in text or "Assert statements" in text


def test_tiny_shakespeare_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSERVE_OFFLINE", "1")
    config = TextDataConfig(source="tiny-shakespeare", data_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        load_corpus(config)
    message = str(info.value)
    assert str(tmp_path / "cache" / SHAKESPEARE_FILENAME) in message
    assert SHAKESPEARE_URL in message
    assert "data.path" in message


def test_tiny_shakespeare_accepts_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSERVE_OFFLINE", "1")
    local = tmp_path / "input.txt"
    local.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n", encoding="utf-8")
    text = load_corpus(TextDataConfig(source="tiny-shakespeare", path=str(local)))
    assert text.startswith("First Citizen:")


def test_vocab_is_sorted_chars_after_unk_and_unknown_chars_encode_to_zero():
    vocab = CharVocab.from_text("hello wörld")
    assert vocab.itos == [UNK, " ", "d", "e", "h", "l", "o", "r", "w", "ö"]
    assert vocab.itos[0] == "<unk>"
    ids = vocab.encode("hölz")
    assert ids.dtype == torch.int64
    assert ids.tolist() == [4, 9, 5, 0]  # 'z' is unknown -> 0
    assert vocab.decode(vocab.encode("world")) == "world"
    assert vocab.decode([0]) == "\ufffd"
    # rebuilt from the checkpoint's list it encodes identically
    assert CharVocab(list(vocab.itos)).encode("hölz").tolist() == [4, 9, 5, 0]
    with pytest.raises(DataError, match="must start with '<unk>'"):
        CharVocab(["a", "b"])


def test_split_is_by_position_last_fraction_is_validation():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert len(val) == 100 and val == text[-100:]
    with pytest.raises(DataError, match="too short"):
        split_text("abc", 0.1)


def test_stream_batches_shapes_and_continuity():
    ids = torch.arange(1000)  # id == position, so continuity is easy to check
    batches = StreamBatches(ids, batch_size=4, seq_len=32)
    stream_len = (1000 - 1) // 4  # 249
    out = list(batches)
    assert len(out) == len(batches) == -(-stream_len // 32)  # 8, the last one shorter
    for x, y in out[:-1]:
        assert x.shape == y.shape == (4, 32)
        assert x.dtype == torch.int64
    assert out[-1][0].shape == (4, stream_len - 7 * 32)
    for x, y in out:
        assert torch.equal(y, x + 1)  # targets are the next character
    for (x0, _), (x1, _) in zip(out, out[1:]):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # row b of batch i+1 continues row b of batch i
    starts = out[0][0][:, 0]
    assert starts.tolist() == [0, 249, 498, 747]  # contiguous streams
    with pytest.raises(DataError, match="train.batch_size=64"):
        StreamBatches(torch.arange(10), batch_size=64, seq_len=8)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"source": "file"}, "data.path"),
        ({"source": "books"}, "data.source"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"val_fraction": 0.9}, "data.val_fraction"),
    ],
)
def test_bad_data_config_names_the_field(raw, field):
    from dataclasses import dataclass

    @dataclass
    class Wrapper:
        data: TextDataConfig

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(Wrapper, {"data": raw})
