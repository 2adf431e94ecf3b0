"""Keeping the cyclic garbage collector's pauses off the serving path.

CPython collects its oldest generation once enough objects have survived into it, and that full collection
walks every tracked object. After start-up most of a server's heap lives as long as the process (modules,
FastAPI's routes and schemas, the graphs' Python wrappers, tokenizers): walking it stalled every request in
flight for ~130 ms on 2 cores. ``settle()`` runs once every model is loaded and warmed up: one full collection,
then ``gc.freeze()`` moves the survivors to the permanent generation, which collections skip. Objects made
later (requests' garbage, models loaded later) are collected as usual, so reference cycles cannot pile up.

What requests leave in the oldest generation is collected when the server goes idle (``IdleCollector``: its
last request answered), not in the middle of a burst; the oldest generation's automatic threshold stays as the
backstop for a server that is never idle.
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger("deepserve.serve")

GC_THRESHOLDS = (700, 10, 100)
"""The collector's thresholds while serving. Young collections as CPython's defaults (short: the start-up heap
is frozen). Full collections: at idle moments (``IdleCollector``), and automatically only after 100 middle-
generation collections without one (CPython's default is 10), which bounds the garbage of a never-idle server;
the tail-latency scenario in ``benchmarks/results`` compares the options."""


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


class IdleCollector:
    """Counts the requests in flight; when the last one is answered and something has reached the oldest
    generation since its last collection, collects it on the event loop's next turn, unless a request came in
    meanwhile. A lone client pays it once per ~7,000 surviving allocations, not per request."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.enabled = True
        """False: full collections only by the thresholds (the benchmark's comparison)."""
        self.collections = 0
        """Full collections run at idle moments."""
        self._pending = False

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        # gc.get_count()[2]: middle-generation collections since the last full one, i.e. objects may have
        # been promoted to the oldest generation
        if self.in_flight == 0 and self.enabled and not self._pending and gc.get_count()[2] > 0:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._collect)

    def _collect(self) -> None:
        self._pending = False
        if self.in_flight == 0:
            gc.collect()
            self.collections += 1


idle = IdleCollector()
"""The process's collector is one: so is its idle hook (the front door's request count)."""
