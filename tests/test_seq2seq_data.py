"""Seq2seq data: TSV files, maths generators (answers checked independently), splits and the tokenizer."""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import pytest

import torch

from deepserve.train.data import math_problems as mp
from deepserve.train.data.parallel import DataError, EncodedPair, make_batch, read_tsv
from deepserve.train.tokenizer import Tokenizer, TokenizerError, train_tokenizer

# ---- TSV ------------------------------------------------------------------------------------------------


def test_read_tsv_reads_pairs_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("What is 1 + 1?\t2\n\nhello world\tbonjour le monde\n", encoding="utf-8")
    examples = read_tsv(path)
    assert [(e.source, e.target, e.kind) for e in examples] == [
        ("What is 1 + 1?", "2", "tsv"),
        ("hello world", "bonjour le monde", "tsv"),
    ]


@pytest.mark.parametrize("bad", ["no tab on this line", "a\tb\tc", "source only\t", "\ttarget only"])
def test_read_tsv_names_file_and_line_of_a_malformed_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text(f"ok\tfine\nalso\tfine\n{bad}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs\.tsv, line 3"):
        read_tsv(path)


def test_read_tsv_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_tsv(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_tsv(tmp_path / "empty.tsv")


def test_make_batch_shifts_targets() -> None:
    batch = make_batch([EncodedPair([5, 6, 3], [7, 8]), EncodedPair([9, 3], [4])], pad_id=0, bos_id=2, eos_id=3,
                       device=torch.device("cpu"))
    assert batch.src.tolist() == [[5, 6, 3], [9, 3, 0]]
    assert batch.tgt_in.tolist() == [[2, 7, 8], [2, 4, 0]]
    assert batch.tgt_out.tolist() == [[7, 8, 3], [4, 3, 0]]


# ---- independent checkers of the generated answers -------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _arith(text: str) -> int:
    """Evaluate an integer expression with + - * and unary minus (no eval())."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected syntax in {text!r}")

    return walk(ast.parse(text, mode="eval"))


_PLACE = {"units": 0, "tens": 1, "hundreds": 2, "thousands": 3, "ten thousands": 4, "hundred thousands": 5}


def check_place_value(q: str, a: str) -> None:
    number = int(re.search(r"\d+", q).group())
    name = re.search(r"the (hundred thousands|ten thousands|units|tens|hundreds|thousands) (?:digit|place)", q).group(1)
    assert a == str(number // 10 ** _PLACE[name] % 10), q


def check_sort(q: str, a: str) -> None:
    m = re.fullmatch(r"(?:Sort|Put|Arrange) (.+?) (?:in (\w+) order|from (\w+) to \w+)\.", q)
    assert m, q
    values = [int(v) for v in m.group(1).split(", ")]
    descending = (m.group(2) or m.group(3)) in ("descending", "decreasing", "largest")
    assert a == ", ".join(str(v) for v in sorted(values, reverse=descending)), q


_ADD_SUB = [
    (r"What is (-?\d+) ([+-]) (-?\d+)\?", None),
    (r"Calculate (-?\d+) ([+-]) (-?\d+)\.", None),
    (r"What is (-?\d+) (plus|minus) (-?\d+)\?", None),
    (r"(?:Add|Sum) (-?\d+) and (-?\d+)\.", lambda x, y: x + y),
    (r"Subtract (-?\d+) from (-?\d+)\.", lambda x, y: y - x),
]


def check_add_sub(q: str, a: str) -> None:
    for pattern, fn in _ADD_SUB:
        m = re.fullmatch(pattern, q)
        if not m:
            continue
        if fn is None:
            x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
            expected = x + y if op in ("+", "plus") else x - y
        else:
            expected = fn(int(m.group(1)), int(m.group(2)))
        assert a == str(expected), q
        return
    raise AssertionError(f"unrecognised add/sub phrasing: {q!r}")


def check_linear(q: str, a: str) -> None:
    m = (re.fullmatch(r"Solve (.+) for ([a-z])\.", q) or re.fullmatch(r"Find ([a-z]) such that (.+)\.", q)
         or re.fullmatch(r"What is ([a-z]) in (.+)\?", q))
    assert m, q
    equation, var = (m.group(1), m.group(2)) if q.startswith("Solve") else (m.group(2), m.group(1))
    lhs, rhs = equation.split(" = ")

    def residual(value: int) -> int:
        sub = lambda side: _arith(re.sub(rf"\b{var}\b", f"({value})", side))  # noqa: E731
        return sub(lhs) - sub(rhs)

    x = int(a)
    assert residual(x) == 0, q
    assert residual(x + 1) != 0, q  # the variable really occurs: the solution is unique


CHECKERS = {"place_value": check_place_value, "sort": check_sort, "add_sub": check_add_sub, "linear_1d": check_linear}


@pytest.mark.parametrize("kind", mp.TASKS)
@pytest.mark.parametrize("extrapolate", [False, True])
def test_generated_answers_are_correct(kind: str, extrapolate: bool) -> None:
    for e in mp.generate(kind, 300, seed=7, extrapolate=extrapolate):
        CHECKERS[kind](e.source, e.target)


def test_checkers_catch_wrong_answers() -> None:
    with pytest.raises(AssertionError):
        check_place_value("What is the tens digit of 52873?", "8")
    with pytest.raises(AssertionError):
        check_sort("Sort -3, 12, 5 in ascending order.", "12, 5, -3")
    with pytest.raises(AssertionError):
        check_add_sub("What is 381 - -27?", "354")
    with pytest.raises(AssertionError):
        check_linear("Solve 3*x + 7 = 19 for x.", "5")


def test_examples_from_the_issue_parse() -> None:
    check_place_value("What is the tens digit of 52873?", "7")
    check_sort("Sort -3, 12, 5 in ascending order.", "-3, 5, 12")
    check_add_sub("What is 381 - -27?", "408")
    check_linear("Solve 3*x + 7 = 19 for x.", "4")


def test_generators_use_several_phrasings() -> None:
    for kind in mp.TASKS:
        openings = {e.source.split()[0] for e in mp.generate(kind, 200, seed=3)}
        assert len(openings) >= 2, (kind, openings)


# ---- splits -----------------------------------------------------------------------------------------------


def _splits(seed: int = 11) -> dict[str, list[mp.Example]]:
    return mp.make_splits(mp.TASKS, n_train=800, n_val=80, n_test=200, n_extrapolate=200, seed=seed)


def test_splits_are_deterministic_and_sized() -> None:
    a, b = _splits(), _splits()
    assert a == b
    assert _splits(seed=12)["train"] != a["train"]
    assert {k: len(v) for k, v in a.items()} == {"train": 800, "val": 80, "test": 200, "extrapolate": 200}
    assert {e.kind for e in a["test"]} == set(mp.TASKS)


def test_train_val_test_are_disjoint_by_question() -> None:
    s = _splits()
    train, val, test = ({e.source for e in s[k]} for k in ("train", "val", "test"))
    assert len(train) == len(s["train"]) and len(test) == len(s["test"])  # no duplicates inside a split
    assert not train & test and not train & val and not val & test


def test_extrapolation_uses_larger_numbers_and_longer_lists() -> None:
    s = _splits()

    def by_kind(split: str, kind: str) -> list[mp.Example]:
        return [e for e in s[split] if e.kind == kind]

    def numbers(e: mp.Example) -> list[int]:
        return [abs(int(n)) for n in re.findall(r"-?\d+", e.source)]

    digits = lambda e: len(re.search(r"\d+", e.source).group())  # noqa: E731
    assert min(map(digits, by_kind("extrapolate", "place_value"))) > max(map(digits, by_kind("train", "place_value")))
    length = lambda e: e.target.count(",") + 1  # noqa: E731
    assert min(map(length, by_kind("extrapolate", "sort"))) > max(map(length, by_kind("train", "sort")))
    largest = lambda e: max(numbers(e))  # noqa: E731
    assert min(map(largest, by_kind("extrapolate", "add_sub"))) > max(map(largest, by_kind("train", "add_sub")))
    answer = lambda e: abs(int(e.target))  # noqa: E731
    assert min(map(answer, by_kind("extrapolate", "linear_1d"))) > max(map(answer, by_kind("train", "linear_1d")))


def test_unknown_task_and_exhausted_question_space(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown math task"):
        mp.generate("calculus", 1, seed=0)
    monkeypatch.setitem(mp.GENERATORS, "place_value", lambda rng, extrapolate: ("What is the units digit of 7?", "7"))
    with pytest.raises(ValueError, match="could only generate 1 distinct place_value"):
        mp.generate("place_value", 2, seed=0)


# ---- tokenizer --------------------------------------------------------------------------------------------

TEXTS = [t for e in _splits()["train"] for t in (e.source, e.target)]


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_tokenizer_round_trip_from_bytes(model_type: str) -> None:
    model_bytes = train_tokenizer(TEXTS, model_type=model_type, vocab_size=120)
    assert isinstance(model_bytes, bytes)
    tok = Tokenizer(bytes(model_bytes))  # a fresh processor, from the bytes alone (as after a checkpoint load)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size <= 120
    for text in ["What is the tens digit of 52873?", "Sort -3, 12, 5 in ascending order.", "-3, 5, 12",
                 "Solve 3*x + 7 = 19 for x.", "What is 90817 - -4406?"]:
        ids = tok.encode(text)
        assert min(ids) >= 4  # no unk, no specials
        assert tok.decode(ids) == text
        assert tok.decode([2, *ids, 3, 0]) == text  # specials are dropped
    pieces = tok.pieces("52873")
    assert [p.lstrip("\u2581") for p in pieces if p != "\u2581"] == list("52873")  # split digits


def test_tokenizer_errors() -> None:
    with pytest.raises(TokenizerError, match="one of"):
        train_tokenizer(["a b"], model_type="word")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer([""])
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(b"definitely not a model")
