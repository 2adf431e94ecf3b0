"""The synchronous client. Request building, parsing and retry decisions live in ``_base``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx

from ._base import BaseClient, Call, SSEDecoder, generate_params, transport_error
from .errors import DeepserveError
from .tensors import ImageInput
from .types import (
    GenerateParams, GenerateResult, InferResult, ModelInfo, ModelMetadata, Prediction, RepositoryEntry, StreamEvent,
)

T = TypeVar("T")


class Client(BaseClient):
    """Blocking client for a deepserve server; use it as a context manager or call ``close()``.

    >>> with Client("http://127.0.0.1:8000") as client:
    ...     client.classify("digit.png", "digits-cnn", top_k=3)
    """

    def _open_http(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, content=call.content, headers=call.headers
                )
            except httpx.TransportError as e:
                error: DeepserveError = transport_error(e, self.base_url)
            else:
                failure = self._error_for(call, response)
                if failure is None:
                    return call.parse(response)
                error = failure
            delay = self.retry_delay(attempt, error)
            if delay is None:
                raise error
            self._sleep(delay)
            attempt += 1

    # ---- API --------------------------------------------------------------------------------------------

    def repository_index(self, *, ready: bool = False) -> list[RepositoryEntry]:
        """Every model version in the server's repository, loaded or not, with its state and reason
        (``ready=True``: only ready ones)."""
        return self._run(self._repository_call("index", body={"ready": True} if ready else None))

    def load_model(self, model: str, *, config: dict[str, Any] | None = None) -> list[RepositoryEntry]:
        """Load or reload ``model`` (``config``: settings replacing its config.json for this load); returns its
        versions once they serve. Needs the admin key, or loopback when the server has none."""
        return self._run(self._repository_call("load", model, self._load_body(config)))

    def unload_model(self, model: str) -> list[RepositoryEntry]:
        """Unload ``model`` once its requests in flight have finished; returns its versions."""
        return self._run(self._repository_call("unload", model))

    def models(self) -> list[ModelInfo]:
        """Every model in the repository, with its versions and readiness."""
        return self._run(self._models_call())

    def ready(self, model: str | None = None, version: str | int | None = None) -> bool:
        """Whether the server (or one model) is ready; ``False`` on 503, errors otherwise."""
        return self._run(self._ready_call(model, version))

    def live(self) -> bool:
        """Whether the server process answers."""
        return self._run(self._live_call())

    def metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        """KServe v2 model metadata: versions, platform, input and output tensors."""
        return self._run(self._metadata_call(model, version))

    def infer(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        version: str | int | None = None,
        outputs: list[str] | None = None,
        binary: bool | None = None,
        request_id: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> InferResult:
        """Run the model on named tensors (v2 protocol). ``binary``: use the binary tensor extension for inputs
        and outputs (``None``: when the inputs reach 64 KiB)."""
        return self._run(self._infer_call(model, inputs, version, outputs, binary, request_id, parameters))

    def classify(
        self, image: ImageInput, model: str, version: str | int | None = None, top_k: int = 5
    ) -> list[Prediction]:
        """Top-k classes of one image (a path, encoded bytes, a PIL image or an HxW[xC] array)."""
        return self._run(self._classify_call(image, model, version, top_k))

    def generate(self, model: str, prompt: str, params: GenerateParams | None = None, *,
                 version: str | int | None = None, **kwargs: Any) -> GenerateResult:
        """Generate text. ``params`` and keyword arguments (which win) are ``GenerateParams`` fields
        (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``num_beams``...), checked here
        against the server's bounds (``ParameterError``)."""
        return self._run(self._generate_call(model, prompt, version, generate_params(params, kwargs)))

    def stream(self, model: str, prompt: str, params: GenerateParams | None = None, *,
               version: str | int | None = None, **kwargs: Any) -> Iterator[StreamEvent]:
        """Generate text as it is produced (parameters as ``generate``). Retries happen only before the first
        event arrives. Close the iterator (or exhaust it) to release the connection."""
        return self._events(self._stream_call(model, prompt, version, generate_params(params, kwargs)))

    def _events(self, call: Call[None]) -> Iterator[StreamEvent]:
        attempt = 0
        while True:
            started = False
            try:
                with self._http.stream(call.method, call.path, content=call.content, headers=call.headers) as response:
                    if response.status_code >= 400:
                        response.read()
                    error = self._error_for(call, response)
                    if error is None:
                        started = True
                        yield from SSEDecoder().events(response.iter_lines())
                        return
            except httpx.TransportError as e:
                if started:
                    raise transport_error(e, self.base_url) from None
                error = transport_error(e, self.base_url)
            delay = self.retry_delay(attempt, error)
            if delay is None:
                raise error
            self._sleep(delay)
            attempt += 1
