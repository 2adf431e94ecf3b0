"""deepserve client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio), typed results and an error tree
(see ``deepserve.clients.errors``).

Names are imported on first use so that ``deepserve <command>`` does not load httpx and numpy just to build
its argument parser (``deepserve.cli`` imports ``deepserve.clients.cli``, which imports this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .errors import (
        APIConnectionError,
        AuthenticationError,
        BadRequestError,
        DeepserveError,
        InvalidParameterError,
        ModelUnavailableError,
        NotFoundError,
        OverloadedError,
        RequestTimeoutError,
        ServerError,
    )
    from .sync import Client
    from .types import (
        GenerateParams,
        GenerateResult,
        InferResult,
        ModelInfo,
        ModelMetadata,
        Prediction,
        RepositoryEntry,
        Sequence,
        StreamEvent,
        TensorInfo,
    )

_EXPORTS = {
    "Client": "sync",
    "AsyncClient": "aio",
    **{
        name: "errors"
        for name in (
            "DeepserveError",
            "AuthenticationError",
            "BadRequestError",
            "InvalidParameterError",
            "ModelUnavailableError",
            "NotFoundError",
            "OverloadedError",
            "RequestTimeoutError",
            "ServerError",
            "APIConnectionError",
        )
    },
    **{
        name: "types"
        for name in (
            "GenerateParams",
            "GenerateResult",
            "InferResult",
            "ModelInfo",
            "ModelMetadata",
            "Prediction",
            "RepositoryEntry",
            "Sequence",
            "StreamEvent",
            "TensorInfo",
        )
    },
}
__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "DeepserveError",
    "GenerateParams",
    "GenerateResult",
    "InferResult",
    "InvalidParameterError",
    "ModelInfo",
    "ModelMetadata",
    "ModelUnavailableError",
    "NotFoundError",
    "OverloadedError",
    "Prediction",
    "RepositoryEntry",
    "RequestTimeoutError",
    "Sequence",
    "ServerError",
    "StreamEvent",
    "TensorInfo",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
