"""Generation models warm their continuous batch's sizes before ready (``serve/shape_warmup.py``), on real
exported artifacts: the bounded set of sizes runs through the step model, and nothing of it stays behind."""

from __future__ import annotations

import asyncio

import pytest

from deepserve.manifest import load_manifest
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.shape_warmup import WARM_STEPS, warm_sizes, warm_step_shapes
from tests.test_generation_serving import repo, settings  # noqa: F401  (repo: the char-LM and seq2seq artifacts)


def test_the_sizes_are_the_largest_then_each_power_of_two_below_it():
    assert warm_sizes(64) == [64, 32, 16, 8, 4, 2, 1]
    assert warm_sizes(24) == [24, 16, 8, 4, 2, 1]
    assert warm_sizes(1) == [1]


@pytest.mark.parametrize("name", ["tiny-charlm", "tiny-seq2seq"])
def test_warm_up_steps_every_size_and_leaves_generation_unchanged(repo, name):
    directory = repo / name / "1"
    probes = [("12+7", {"temperature": 0, "max_new_tokens": 8}), ("ab", {"num_beams": 3, "max_new_tokens": 6})]

    async def main():
        s = GenerationServable(load_manifest(directory), directory, settings(max_running_rows=24), "cpu")
        await s.start()
        await s.warmup()
        try:
            before = [await s.generate(t, p) for t, p in probes]
            seen: list[int] = []
            step = s.model.step
            s.model.step = lambda tokens: (seen.append(len(tokens)), step(tokens))[1]  # counts, then runs it
            sizes = await warm_step_shapes(s)
            s.model.step = step
            after = [await s.generate(t, p) for t, p in probes]
            return sizes, seen, s.model.rows, before, after
        finally:
            await s.stop()

    sizes, seen, rows, before, after = asyncio.run(main())
    assert sizes == [24, 16, 8, 4, 2, 1]
    assert seen == [n for n in sizes for _ in range(WARM_STEPS)]
    assert rows == 0  # the batch is empty again
    for a, b in zip(before, after):
        assert [(o.token_ids, o.finish_reason) for o in a.outputs] == [(o.token_ids, o.finish_reason) for o in b.outputs]
