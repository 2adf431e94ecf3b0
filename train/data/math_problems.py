"""School-mathematics question/answer generators in the style of DeepMind's mathematics dataset.

Four problem types, each with several phrasings:

- ``place_value``: "What is the tens digit of 52873?" -> "7"
- ``sort``:        "Sort -3, 12, 5 in ascending order." -> "-3, 5, 12"
- ``add_sub``:     "What is 381 - -27?" -> "408"
- ``linear_1d``:   "Solve 3*x + 7 = 19 for x." -> "4"

Everything is deterministic in the seed. ``make_splits`` returns train/val/test drawn from the same
(interpolation) ranges but disjoint by exact question string, and an ``extrapolate`` split with larger numbers
or longer lists than training ever shows.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import NamedTuple


class Example(NamedTuple):
    source: str
    target: str
    kind: str
    """Problem type (one of ``TASKS``, or ``"tsv"`` for parallel files)."""


PLACES = ("units", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands")

# ranges: (interpolation, extrapolation)
PLACE_VALUE_DIGITS = ((2, 6), (7, 9))  # digits of the number; the asked place is always one of PLACES
SORT_LENGTH = ((3, 5), (6, 8))  # list lengths; values from SORT_RANGE in both splits
SORT_RANGE = 99
ADD_SUB_RANGE = ((0, 999), (1000, 99999))  # absolute values of the operands
LINEAR_RANGES = {  # (solution, coefficient, constant) absolute value ranges
    False: ((0, 10), (1, 10), (0, 20)),
    True: ((11, 100), (11, 30), (21, 200)),
}
VARIABLES = "abcdfghjklmnpqrstuvwxyz"


def _signed(rng: random.Random, lo: int, hi: int) -> int:
    """A random integer whose absolute value is in [lo, hi], either sign."""
    n = rng.randint(lo, hi)
    return -n if n and rng.random() < 0.5 else n


def place_value(rng: random.Random, extrapolate: bool = False) -> tuple[str, str]:
    lo, hi = PLACE_VALUE_DIGITS[extrapolate]
    digits = rng.randint(lo, hi)
    n = rng.randint(10 ** (digits - 1), 10**digits - 1)
    place = rng.randrange(min(digits, len(PLACES)))
    name = PLACES[place]
    answer = str(n)[-1 - place]
    question = rng.choice(
        [
            f"What is the {name} digit of {n}?",
            f"What is the {name} digit of the number {n}?",
            f"Give the {name} digit of {n}.",
            f"In {n}, what is the {name} digit?",
            f"Which digit is in the {name} place of {n}?",
        ]
    )
    return question, answer


def sort_numbers(rng: random.Random, extrapolate: bool = False) -> tuple[str, str]:
    lo, hi = SORT_LENGTH[extrapolate]
    values = rng.sample(range(-SORT_RANGE, SORT_RANGE + 1), rng.randint(lo, hi))
    descending = rng.random() < 0.5
    items = ", ".join(str(v) for v in values)
    if descending:
        question = rng.choice(
            [
                f"Sort {items} in descending order.",
                f"Sort {items} in decreasing order.",
                f"Put {items} in descending order.",
                f"Arrange {items} from largest to smallest.",
            ]
        )
    else:
        question = rng.choice(
            [
                f"Sort {items} in ascending order.",
                f"Sort {items} in increasing order.",
                f"Put {items} in ascending order.",
                f"Arrange {items} from smallest to largest.",
            ]
        )
    return question, ", ".join(str(v) for v in sorted(values, reverse=descending))


def add_sub(rng: random.Random, extrapolate: bool = False) -> tuple[str, str]:
    lo, hi = ADD_SUB_RANGE[extrapolate]
    a, b = _signed(rng, lo, hi), _signed(rng, lo, hi)
    if rng.random() < 0.5:
        question = rng.choice(
            [
                f"What is {a} + {b}?",
                f"Calculate {a} + {b}.",
                f"Add {a} and {b}.",
                f"What is {a} plus {b}?",
                f"Sum {a} and {b}.",
            ]
        )
        return question, str(a + b)
    question = rng.choice(
        [f"What is {a} - {b}?", f"Calculate {a} - {b}.", f"Subtract {b} from {a}.", f"What is {a} minus {b}?"]
    )
    return question, str(a - b)


def _term(coef: int, var: str) -> str:
    """3, x -> "3*x"; 1 -> "x"; -1 -> "-x"."""
    return var if coef == 1 else f"-{var}" if coef == -1 else f"{coef}*{var}"


def _plus(text: str) -> str:
    """Join a following term with its sign: "-3*x" -> " - 3*x", "7" -> " + 7"."""
    return f" - {text[1:]}" if text.startswith("-") else f" + {text}"


def linear_1d(rng: random.Random, extrapolate: bool = False) -> tuple[str, str]:
    (x_lo, x_hi), (a_lo, a_hi), (b_lo, b_hi) = LINEAR_RANGES[extrapolate]
    x, a, b = _signed(rng, x_lo, x_hi), _signed(rng, a_lo, a_hi), _signed(rng, b_lo, b_hi)
    v = rng.choice(VARIABLES)
    c = a * x + b
    term = _term(a, v)
    lhs = rng.choice([term + (_plus(str(b)) if b else ""), (f"{b}{_plus(term)}" if b else term)])
    equation = rng.choice([f"{lhs} = {c}", f"{c} = {lhs}"])
    question = rng.choice(
        [f"Solve {equation} for {v}.", f"What is {v} in {equation}?", f"Find {v} such that {equation}."]
    )
    return question, str(x)


GENERATORS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {
    "place_value": place_value,
    "sort": sort_numbers,
    "add_sub": add_sub,
    "linear_1d": linear_1d,
}
TASKS: tuple[str, ...] = tuple(GENERATORS)


def _share(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def generate(
    kind: str, n: int, seed: int | str, *, extrapolate: bool = False, exclude: set[str] | frozenset[str] = frozenset()
) -> list[Example]:
    """``n`` distinct examples of one problem type whose questions are not in ``exclude``."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown math task {kind!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{kind}/{extrapolate}")
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only generate {len(out)} distinct {kind} questions of the {n} asked for")
        question, answer = GENERATORS[kind](rng, extrapolate)
        if question in seen or question in exclude:
            continue
        seen.add(question)
        out.append(Example(question, answer, kind))
    return out


def make_splits(
    tasks: Sequence[str], *, n_train: int, n_val: int, n_test: int, n_extrapolate: int, seed: int
) -> dict[str, list[Example]]:
    """Mixed splits over ``tasks`` (sizes shared equally between them).

    test is drawn first, then val (excluding test), then train (excluding both), so train, val and test are
    disjoint by question string and the test set does not depend on the training size.
    """
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": [], "extrapolate": []}
    totals = {"train": n_train, "val": n_val, "test": n_test, "extrapolate": n_extrapolate}
    sizes = {name: _share(n, len(tasks)) for name, n in totals.items()}
    for i, kind in enumerate(tasks):
        test = generate(kind, sizes["test"][i], f"{seed}/test", exclude=set())
        taken = {e.source for e in test}
        val = generate(kind, sizes["val"][i], f"{seed}/val", exclude=taken)
        taken |= {e.source for e in val}
        splits["train"] += generate(kind, sizes["train"][i], f"{seed}/train", exclude=taken)
        splits["val"] += val
        splits["test"] += test
        splits["extrapolate"] += generate(kind, sizes["extrapolate"][i], f"{seed}/extrapolate", extrapolate=True)
    random.Random(f"{seed}/shuffle").shuffle(splits["train"])
    return splits
