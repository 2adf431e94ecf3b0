"""Keeping the cyclic garbage collector's pauses off the serving path.

CPython collects its oldest generation once enough objects have survived into it, and that full collection
walks every tracked object. After start-up most of a server's heap lives as long as the process (modules,
FastAPI's routes and schemas, the graphs' Python wrappers, tokenizers): walking it stalled every request in
flight for ~130 ms on 2 cores. ``settle()`` runs once every model is loaded and warmed up: one full collection,
then ``gc.freeze()`` moves the survivors to the permanent generation, which collections skip. Objects made
later (requests' garbage, models loaded later) are collected as usual, so reference cycles cannot pile up.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("deepserve.serve")

GC_THRESHOLDS = (700, 10, 10)
"""The collector's thresholds while serving. CPython's defaults: with the start-up heap frozen, the young
collections are short and the full ones walk only what was made since; larger thresholds measured no better
(``benchmarks/results``, the tail-latency scenario)."""


def settle() -> int:
    """Collect once, freeze what survives and set the serving thresholds; returns the frozen object count.

    Called again after a model is loaded or unloaded at run time: it unfreezes first, so that what an unloaded
    model left in reference cycles is collected (frozen garbage is never freed), then freezes what survives."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d start-up objects frozen, thresholds %s", frozen, GC_THRESHOLDS)
    return frozen
