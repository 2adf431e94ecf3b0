"""What the sync and async clients share: settings, request building, response parsing, retry decisions
and server-sent-event decoding. The clients only do the I/O."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from deepserve import __version__

from . import errors
from .errors import APIConnectionError, DeepserveError, OverloadedError, RequestTimeoutError
from .tensors import HEADER_LENGTH, ImageInput, build_body, decode_outputs, encode_image, encode_inputs, split_body
from .types import (
    GenerateParams,
    ParameterError,
    GenerateRequest,
    GenerateResult,
    InferRequest,
    InferResult,
    ModelInfo,
    ModelMetadata,
    Prediction,
    RepositoryEntry,
    StreamEvent,
    from_wire,
)

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
BINARY_THRESHOLD = 64 * 1024
"""Inputs of at least this many bytes in all go over the binary tensor extension when ``binary=None``."""

@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP exchange: what to send and how to read the answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    accept: frozenset[int] = frozenset()
    """Error statuses that ``parse`` handles itself (not raised, not retried)."""


def _check(condition: bool, name: str, message: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


def _model_path(model: str, version: str | int | None) -> str:
    _check(isinstance(model, str) and bool(model), "model", "must be a non-empty string", model)
    path = f"/v2/models/{quote(model, safe='')}"
    return path if version is None else f"{path}/versions/{quote(str(version), safe='')}"


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise DeepserveError(f"the server's {what} response is not JSON: {response.text[:200]!r}") from None


def transport_error(exc: httpx.TransportError, base_url: str) -> DeepserveError:
    """A connection-level failure as an SDK error: timeouts after connecting are not retried."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return RequestTimeoutError(f"no answer from {base_url} within the timeout ({type(exc).__name__})")
    reason = str(exc) or type(exc).__name__
    return APIConnectionError(f"cannot reach the deepserve server at {base_url}: {reason}")


class SSEDecoder:
    """Turns the lines of a ``text/event-stream`` into ``StreamEvent`` objects (``data: {...}`` events)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = "message"
        self.done = False

    def feed(self, line: str) -> StreamEvent | None:
        line = line.rstrip("\r\n")
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            return None  # comments (":keep-alive"), id and retry fields are ignored
        data, event = "\n".join(self._data), self._event
        self._data, self._event = [], "message"
        if not data:
            return None
        if data == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise DeepserveError(f"malformed server-sent event: {data[:200]!r}") from None
        if event == "error" or (isinstance(payload, dict) and "error" in payload):
            message = payload.get("error", data) if isinstance(payload, dict) else data
            status = payload.get("status") if isinstance(payload, dict) else None
            code = payload.get("code") if isinstance(payload, dict) else None
            cls = errors.error_class(status, code) if isinstance(status, int) else errors.ServerError
            self.done = True
            raise cls(str(message), status_code=status if isinstance(status, int) else None)
        return dataclasses.replace(from_wire(StreamEvent, payload, "stream event"), raw=payload)

    def finish(self) -> StreamEvent | None:
        """The last event, when the stream ended without its blank line."""
        return None if self.done else self.feed("")

    def events(self, lines: Iterable[str]) -> Iterable[StreamEvent]:
        for line in lines:
            event = self.feed(line)
            if event is not None:
                yield event
            if self.done:
                return
        event = self.finish()
        if event is not None:
            yield event


class BaseClient:
    """Settings, request builders and retry policy shared by ``Client`` and ``AsyncClient``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: Any = None,
    ) -> None:
        """``transport``: an ``httpx`` transport (sync for ``Client``, async for ``AsyncClient``), for tests or
        custom networking; by default httpx's own."""
        _check(
            isinstance(base_url, str) and base_url.startswith(("http://", "https://")),
            "base_url",
            "must start with http:// or https://",
            base_url,
        )
        _check(timeout > 0, "timeout", "must be > 0 seconds", timeout)
        _check(isinstance(max_retries, int) and max_retries >= 0, "max_retries", "must be an integer >= 0", max_retries)
        _check(backoff >= 0, "backoff", "must be >= 0 seconds", backoff)
        _check(max_backoff >= backoff, "max_backoff", "must be >= backoff", max_backoff)
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._headers = {"User-Agent": f"deepserve-client/{__version__}"}
        api_key = api_key if api_key is not None else os.environ.get("DEEPSERVE_API_KEY")
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._random = random.Random()
        self._http = self._open_http(transport)

    def _open_http(self, transport: Any) -> Any:
        """The httpx client doing the I/O (``httpx.Client`` or ``httpx.AsyncClient``); the base alone builds
        requests and decides retries, and does no I/O."""
        return None

    # ---- retries ----------------------------------------------------------------------------------------

    def retry_delay(self, attempt: int, error: DeepserveError) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or ``None`` to give up and raise ``error``.

        Only overload (429/503) and connection errors are retried. The wait is exponential backoff with jitter
        (half to all of ``backoff * 2**attempt``, capped at ``max_backoff``), and never shorter than the
        server's Retry-After; a Retry-After longer than ``max_backoff`` is not waited for."""
        if attempt >= self.max_retries or not isinstance(error, (OverloadedError, APIConnectionError)):
            return None
        ceiling: float = min(self.max_backoff, self.backoff * 2.0**attempt)
        delay = ceiling * (0.5 + 0.5 * self._random.random())
        if error.retry_after is not None:
            if error.retry_after > self.max_backoff:
                return None
            delay = max(delay, error.retry_after)
        return delay

    def _error_for(self, call: Call[Any], response: httpx.Response) -> DeepserveError | None:
        if response.status_code < 400 or response.status_code in call.accept:
            return None
        return errors.error_from_response(
            response.status_code, response.content, response.reason_phrase, response.headers.get("Retry-After")
        )

    # ---- request builders -------------------------------------------------------------------------------

    def _models_call(self) -> Call[list[ModelInfo]]:
        def parse(r: httpx.Response) -> list[ModelInfo]:
            body = _json(r, "model index")
            items = body.get("models") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise DeepserveError(f"unexpected model index from the server: {str(body)[:200]}")
            return [from_wire(ModelInfo, m, "model index") for m in items]

        return Call("GET", "/v2/models", parse)

    def _repository_call(self, action: str, model: str | None = None,
                         body: dict[str, Any] | None = None) -> Call[list[RepositoryEntry]]:
        """``index`` (``model`` None), or ``load`` / ``unload`` of ``model``: Triton's model repository extension."""
        def parse(r: httpx.Response) -> list[RepositoryEntry]:
            rows = _json(r, "repository index")
            if not isinstance(rows, list):
                raise DeepserveError(f"unexpected repository index from the server: {str(rows)[:200]}")
            return [from_wire(RepositoryEntry, row, "repository index") for row in rows]

        if model is None:
            path = "/v2/repository/index"
        else:
            _check(isinstance(model, str) and bool(model), "model", "must be a non-empty string", model)
            path = f"/v2/repository/models/{quote(model, safe='')}/{action}"
        return Call("POST", path, parse, content=json.dumps(body or {}).encode(),
                    headers={"Content-Type": "application/json"})

    def _load_body(self, config: dict[str, Any] | None) -> dict[str, Any]:
        _check(config is None or isinstance(config, dict), "config", "must be a dict of settings", config)
        return {} if config is None else {"parameters": {"config": json.dumps(config)}}

    def _ready_call(self, model: str | None, version: str | int | None) -> Call[bool]:
        path = "/v2/health/ready" if model is None else _model_path(model, version) + "/ready"
        return Call("GET", path, lambda r: r.status_code == 200, accept=frozenset({503}))

    def _live_call(self) -> Call[bool]:
        return Call("GET", "/v2/health/live", lambda r: r.status_code == 200, accept=frozenset({503}))

    def _metadata_call(self, model: str, version: str | int | None) -> Call[ModelMetadata]:
        def parse(r: httpx.Response) -> ModelMetadata:
            body = _json(r, "metadata")
            meta = from_wire(ModelMetadata, body, "metadata")
            return dataclasses.replace(meta, raw=body)

        return Call("GET", _model_path(model, version), parse)

    def _infer_call(
        self,
        model: str,
        inputs: dict[str, Any],
        version: str | int | None,
        outputs: list[str] | None,
        binary: bool | None,
        request_id: str | None,
        parameters: dict[str, Any] | None,
    ) -> Call[InferResult]:
        _check(isinstance(inputs, dict) and bool(inputs), "inputs", "must be a non-empty dict of name -> array", inputs)
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        if binary is None:
            binary = sum(a.nbytes for a in arrays.values()) >= BINARY_THRESHOLD
        specs, chunks = encode_inputs(arrays, binary=binary)
        header: InferRequest = {"inputs": specs}
        if request_id is not None:
            header["id"] = request_id
        if parameters:
            header["parameters"] = dict(parameters)
        if outputs is not None:
            header["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
        elif binary:
            header.setdefault("parameters", {})["binary_data_output"] = True
        content, headers = build_body(dict(header), chunks)

        def parse(r: httpx.Response) -> InferResult:
            body, raw = split_body(r.content, r.headers.get(HEADER_LENGTH))
            result = from_wire(InferResult, body, "inference")
            decoded = decode_outputs(body.get("outputs") or [], raw)
            return InferResult(result.model_name, result.model_version, result.id, decoded)

        return Call("POST", _model_path(model, version) + "/infer", parse, content=content, headers=headers)

    def _classify_call(
        self, image: ImageInput, model: str, version: str | int | None, top_k: int
    ) -> Call[list[Prediction]]:
        _check(isinstance(top_k, int) and top_k >= 1, "top_k", "must be an integer >= 1", top_k)
        _check(isinstance(model, str) and bool(model), "model", "must be a non-empty string", model)
        content, content_type = encode_image(image)
        path = f"/predictions/{quote(model, safe='')}"
        if version is not None:
            path += f"/{quote(str(version), safe='')}"

        def parse(r: httpx.Response) -> list[Prediction]:
            body = _json(r, "prediction")
            if not isinstance(body, list):
                raise DeepserveError(f"unexpected prediction response from the server: {str(body)[:200]}")
            return [from_wire(Prediction, p, "prediction") for p in body]

        return Call(
            "POST", path, parse, params={"top_k": top_k}, content=content, headers={"Content-Type": content_type}
        )

    def _generate_body(self, prompt: str, params: GenerateParams) -> tuple[bytes, dict[str, str]]:
        _check(isinstance(prompt, str), "prompt", "must be a string", prompt)
        body: GenerateRequest = {"text_input": prompt, "parameters": params.changed()}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}

    def _generate_call(
        self, model: str, prompt: str, version: str | int | None, params: GenerateParams
    ) -> Call[GenerateResult]:
        content, headers = self._generate_body(prompt, params)

        def parse(r: httpx.Response) -> GenerateResult:
            return from_wire(GenerateResult, _json(r, "generation"), "generation")

        return Call("POST", _model_path(model, version) + "/generate", parse, content=content, headers=headers)

    def _stream_call(self, model: str, prompt: str, version: str | int | None, params: GenerateParams) -> Call[None]:
        content, headers = self._generate_body(prompt, params)
        headers["Accept"] = "text/event-stream"
        return Call(
            "POST", _model_path(model, version) + "/generate_stream", lambda r: None, content=content, headers=headers
        )


def generate_params(params: GenerateParams | None, overrides: dict[str, Any]) -> GenerateParams:
    """``params`` (default: all defaults) with the keyword arguments ``overrides`` applied, checked against the
    server's bounds here, before anything is sent (``InvalidParameterError`` names the parameter)."""
    base = params.changed() if params is not None else {}
    try:
        return GenerateParams.from_dict({**base, **overrides}) if overrides or params is None else params
    except ParameterError as e:
        raise errors.InvalidParameterError(e.message, parameter=e.parameter, value=e.value) from None
