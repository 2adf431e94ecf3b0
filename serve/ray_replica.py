"""A model's Ray Serve deployment: each replica holds the model's servables with deepserve's own app, batchers
and generation engine, unchanged. Every model is its own Ray Serve application (``model_app``), which the
ingress deploys when the model loads and deletes when it unloads (``ray_control.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve
from starlette.types import Message

from deepserve.serve.app import create_app
from deepserve.serve.model_dir import single_model_view
from deepserve.serve.ray_app import APP_NAME
from deepserve.serve.ray_bridge import run_stream, run_unary
from deepserve.serve.repository import ModelRepository
from deepserve.signing import ArtifactTrust


class ReplicaStartFailed(RuntimeError):
    """A replica none of whose versions loaded; its one-line message names the model and each version's reason."""


def model_app(model: str) -> str:
    """The Ray Serve application of ``model`` (``deepserve.<model>``; the ingress's is ``deepserve``): its one
    deployment is named after the model."""
    return f"{APP_NAME}.{model}"


@dataclass(frozen=True)
class ServingOptions:
    """What ``deepserve serve`` flags give every replica (picklable: Ray ships it to each)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelSettings fields from flags (None = not given); DEEPSERVE_* variables apply in each replica too."""
    device: str = "auto"
    max_body_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    trust: ArtifactTrust = field(default_factory=ArtifactTrust)
    """Trusted keys and whether folders may be symlinks out of the repository (``--trusted-keys`` ...)."""
    graceful_timeout_s: float = 30.0
    """How long a stopping replica may take to drain (Ray's graceful_shutdown_timeout_s)."""


@serve.deployment
class ModelReplica:
    """One replica of one model: its versions loaded, verified and warmed up by ``ModelRepository``."""

    async def __init__(self, repository: str, model: str, options: ServingOptions,
                       config: dict[str, Any] | None = None) -> None:
        self.model = model
        view = single_model_view(Path(repository) / model, model,
                                 allow_symlinks_out=options.trust.allow_symlinks_out)
        self.repository = ModelRepository(view, overrides=options.overrides, device=options.device,
                                          max_pixels=options.max_pixels,
                                          trust=replace(options.trust, allow_symlinks_out=True))  # the view's link
        self.repository.model(model).config_override = config  # a load call's settings, in place of the file's
        self.app = create_app(self.repository, max_body_bytes=options.max_body_bytes)
        self.app.echo_request_id = False  # the ingress gave it the request's id, and answers with it
        await self.repository.start()
        entry = self.repository.model(model)
        if not any(v.ready for v in entry.versions.values()):  # Ray retries, then fails the deploy with this
            reasons = "; ".join(f"version {v.version}: {v.reason}" for v in entry.versions.values())
            await self.repository.stop()
            raise ReplicaStartFailed(f"no version of model {model!r} loaded ({reasons or entry.reason})")
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def describe(self) -> dict[int, dict[str, Any]]:
        """Version -> ready, reason and (when ready) the servable's v2 metadata."""
        out = {}
        for status in self.repository.index()["models"][0]["version_status"]:
            version = int(status["version"])
            ready = status["ready"]
            meta = self.repository.get(self.model, version).metadata() if ready else None
            out[version] = {"ready": ready, "reason": status["reason"], "metadata": meta}
        return out

    async def request(self, scope: dict[str, Any], body: bytes) -> tuple[Message, bytes]:
        return await run_unary(self.app, scope, body, self.replica)

    async def stream(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        async for message in run_stream(self.app, scope, body, self.replica):
            yield message

    async def metrics(self) -> tuple[str, str]:
        """This replica's id and its Prometheus text (batchers, generation engine, process)."""
        return self.replica, self.repository.metrics.render()[0].decode()

    async def check_health(self) -> None:
        if not self.repository.ready:
            raise RuntimeError(f"model {self.model}: repository not started or stopping")

    async def __del__(self) -> None:
        await self.repository.stop()  # drain: queued and in-flight work finishes first
