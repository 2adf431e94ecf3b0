"""``/metrics`` under Ray: the ingress's own series and every model replica's, in one Prometheus exposition.

Each replica keeps its batchers' and generation engine's metrics in its own process. A scrape of the ingress
asks every replica of every model for its exposition (Ray Serve's ``DeploymentHandle.broadcast``), parses them
with ``prometheus_client``'s parser and adds a ``replica`` label (Ray's replica id) to each of their samples, so
the families are those of ``deepserve serve`` and a replica's series stay apart from its peers' (Prometheus'
convention: ``sum by (model)`` aggregates them).

The ingress answers the families it measures itself: HTTP requests and their latency, model readiness and
state, loads and unloads, refused requests and lost replicas (every request passes it, so the replicas' own
counts of the same requests are not repeated). Every other family comes from the replicas; the process and
Python families have the ingress's unlabelled series beside the replicas' labelled ones.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from deepserve.serve.metrics import Metrics

log = logging.getLogger("deepserve.serve")

REPLICA_LABEL = "replica"
SCRAPE_TIMEOUT_S = 5.0
"""How long a scrape waits for the replicas; one that does not answer in time is left out of that scrape."""
_REPLICA_FAMILIES = ("deepserve_batch_size", "deepserve_inference_seconds", "deepserve_queue_depth")
"""Families of the repository's registry that only replicas measure (the ingress runs no batcher)."""


def ingress_families(metrics: Metrics) -> frozenset[str]:
    """The families the ingress answers itself: its repository registry's, but the replicas' batch families."""
    return frozenset(m.name for m in metrics.registry.collect()) - set(_REPLICA_FAMILIES)


def _family(name: str) -> str:
    """The family a parsed one belongs to (the parser gives ``X_created`` series a family of their own)."""
    return name.removesuffix("_created")


def merge(own: str, replicas: Iterable[tuple[str, str]], owned: frozenset[str]) -> list[Metric]:
    """The ingress's exposition ``own`` with each ``(replica id, exposition)``'s families added, their samples
    labelled by replica; families in ``owned`` are the ingress's alone."""
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(own):
        families[family.name] = family
    for replica, text in replicas:
        for family in text_string_to_metric_families(text):
            if _family(family.name) in owned:
                continue
            target = families.get(family.name)
            if target is None:
                target = families[family.name] = Metric(family.name, family.documentation, family.type)
            target.samples.extend(s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples)
    return list(families.values())


class _Families:
    """A collector of already-built families (``generate_latest`` renders collectors)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


async def scrape(metrics: Metrics, handles: dict[str, Any], owned: frozenset[str]) -> tuple[bytes, str]:
    """The merged exposition: the ingress's ``metrics`` and those of every replica behind ``handles``; ``owned``
    is ``ingress_families(metrics)``, built once the ingress has registered its families."""
    answers = await asyncio.gather(*(h.broadcast("metrics").results_async(timeout_s=SCRAPE_TIMEOUT_S,
                                                                          return_exceptions=True)
                                     for h in handles.values()), return_exceptions=True)
    replicas: list[tuple[str, str]] = []
    for model, answer in zip(handles, answers):
        for item in answer if isinstance(answer, list) else [answer]:
            if isinstance(item, BaseException):  # a replica going away or busy past the timeout: next scrape
                log.info("model %s: a replica's metrics are left out of this scrape (%s)", model, item)
            else:
                replicas.append(item)
    own, _ = metrics.render()
    return render(merge(own.decode(), replicas, owned)), CONTENT_TYPE_LATEST
