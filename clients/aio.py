"""The asynchronous client: the same API as ``Client`` with ``await`` (``stream`` is an async iterator).
Request building, parsing and retry decisions live in ``_base``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx

from ._base import BaseClient, Call, SSEDecoder, generate_params, transport_error
from .errors import DeepserveError
from .tensors import ImageInput
from .types import (
    GenerateParams, GenerateResult, InferResult, ModelInfo, ModelMetadata, Prediction, RepositoryEntry, StreamEvent,
)

T = TypeVar("T")


class AsyncClient(BaseClient):
    """Non-blocking client for a deepserve server; use it as an async context manager or ``await aclose()``.

    >>> async with AsyncClient("http://127.0.0.1:8000") as client:
    ...     async for event in client.stream("charlm-lstm", "Once upon", max_tokens=40):
    ...         print(event.text, end="")
    """

    def _open_http(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
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
            await self._sleep(delay)
            attempt += 1

    # ---- API (see Client for the documentation of each method) ------------------------------------------

    async def repository_index(self, *, ready: bool = False) -> list[RepositoryEntry]:
        """Every model version in the server's repository, loaded or not, with its state and reason
        (``ready=True``: only ready ones)."""
        return await self._run(self._repository_call("index", body={"ready": True} if ready else None))

    async def load_model(self, model: str, *, config: dict[str, Any] | None = None) -> list[RepositoryEntry]:
        """Load or reload ``model`` (``config``: settings replacing its config.json for this load); returns its
        versions once they serve. Needs the admin key, or loopback when the server has none."""
        return await self._run(self._repository_call("load", model, self._load_body(config)))

    async def unload_model(self, model: str) -> list[RepositoryEntry]:
        """Unload ``model`` once its requests in flight have finished; returns its versions."""
        return await self._run(self._repository_call("unload", model))

    async def models(self) -> list[ModelInfo]:
        return await self._run(self._models_call())

    async def ready(self, model: str | None = None, version: str | int | None = None) -> bool:
        return await self._run(self._ready_call(model, version))

    async def live(self) -> bool:
        return await self._run(self._live_call())

    async def metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        return await self._run(self._metadata_call(model, version))

    async def infer(
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
        return await self._run(self._infer_call(model, inputs, version, outputs, binary, request_id, parameters))

    async def classify(
        self, image: ImageInput, model: str, version: str | int | None = None, top_k: int = 5
    ) -> list[Prediction]:
        return await self._run(self._classify_call(image, model, version, top_k))

    async def generate(self, model: str, prompt: str, params: GenerateParams | None = None, *,
                       version: str | int | None = None, **kwargs: Any) -> GenerateResult:
        """Generate text; parameters as ``Client.generate``."""
        return await self._run(self._generate_call(model, prompt, version, generate_params(params, kwargs)))

    def stream(self, model: str, prompt: str, params: GenerateParams | None = None, *,
               version: str | int | None = None, **kwargs: Any) -> AsyncIterator[StreamEvent]:
        """An async iterator of events; retries happen only before the first event arrives."""
        return self._events(self._stream_call(model, prompt, version, generate_params(params, kwargs)))

    async def _events(self, call: Call[None]) -> AsyncIterator[StreamEvent]:
        attempt = 0
        while True:
            started = False
            try:
                async with self._http.stream(
                    call.method, call.path, content=call.content, headers=call.headers
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                    error = self._error_for(call, response)
                    if error is None:
                        started = True
                        decoder = SSEDecoder()
                        async for line in response.aiter_lines():
                            event = decoder.feed(line)
                            if event is not None:
                                yield event
                            if decoder.done:
                                return
                        event = decoder.finish()
                        if event is not None:
                            yield event
                        return
            except httpx.TransportError as e:
                if started:
                    raise transport_error(e, self.base_url) from None
                error = transport_error(e, self.base_url)
            delay = self.retry_delay(attempt, error)
            if delay is None:
                raise error
            await self._sleep(delay)
            attempt += 1
