"""Warming a continuous batch's shapes before a generation model reports ready (as Triton's model warm-up does
for the batch sizes a dynamic batcher forms).

The engine's own ``warmup`` runs one greedy and one beam request: batches of 1 and 2 rows. Under load the
continuous batch holds up to ``max_running_rows`` rows, and a runtime's first call at a larger shape grows its
memory arena and plans for it, which the first burst after a start or a scale-up would pay in its tail.
Every row count from 1 to ``max_running_rows`` would be 64 sizes, and the seq2seq decoder's shape changes with
the cache length at every step anyway, so a bounded set is run instead: the largest batch first (an arena grown
for it serves every smaller one), then each power of two below it; each size joins its rows (prefill, or the
encoder) and takes two decoding steps.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

log = logging.getLogger("deepserve.serve")

WARM_PROMPT = "The quick brown fox jumps"
"""Text whose tokens the warm-up's rows start from (a few tokens: the char-LM's prefill has something to run)."""
WARM_STEPS = 2
"""Decoding steps per warmed size: the first runs the new shape, the second its successor state."""


def warm_sizes(max_rows: int) -> list[int]:
    """``max_rows`` then every power of two below it, largest first: ``64 -> [64, 32, 16, 8, 4, 2, 1]``."""
    sizes = [max_rows]
    size = 1 << (max_rows.bit_length() - 1)
    while size >= 1:
        if size != max_rows:
            sizes.append(size)
        size //= 2
    return sizes


def _run_sizes(model: Any, prompt: list[int], sizes: list[int]) -> None:
    """Join, step and drop each size on the step model (blocking; the scheduler is idle meanwhile)."""
    empty = np.zeros(0, np.int64)
    for rows in sizes:
        tokens = model.join([prompt] * rows, [1] * rows)
        for _ in range(WARM_STEPS):
            logits = model.step(tokens)
            tokens = np.argmax(logits, axis=-1).astype(np.int64)
        model.reorder(empty)  # back to an empty batch, as the scheduler left it


async def warm_step_shapes(servable: Any) -> list[int]:
    """Run the bounded set of batch sizes through a generation servable's step model; returns the sizes (none
    for a servable without a continuous batch). Called after the servable's own warm-up and before it is
    published, so no request can be running: the scheduler is idle and waiting, and is asked to confirm it."""
    scheduler, model = getattr(servable, "scheduler", None), getattr(servable, "model", None)
    if scheduler is None or model is None:
        return []
    if not await asyncio.to_thread(scheduler.wait_rows, 0, 30.0) or model.rows:
        log.warning("model %s: its batch did not empty after warm-up; batch shapes left cold", servable.manifest.name)
        return []
    sizes = warm_sizes(scheduler.max_running_rows)
    prompt = servable.encode_prompt(WARM_PROMPT)
    await asyncio.to_thread(_run_sizes, model, prompt, sizes)
    return sizes
