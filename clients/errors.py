"""Errors raised by the deepserve client SDK.

Every error is a ``DeepserveError`` carrying ``status_code`` (the HTTP status, or ``None`` when no response
came back) and ``message`` (the server's ``{"error": "..."}`` text, or a description of what went wrong)::

    DeepserveError
    ├── BadRequestError      400, 413, 415, 422 and any other 4xx below: the request is wrong; never retried
    │   ├── InvalidParameterError  a generation parameter out of bounds, found before sending (status None)
    │   └── AuthenticationError  401 (no or wrong API key) and 403 (not allowed here)
    ├── NotFoundError        404: unknown model or version; never retried
    ├── OverloadedError      429, and a 503 whose body says ``"code": "overloaded"`` (a full queue): retried,
    │                        honouring ``retry_after`` (seconds, from the Retry-After header) until max_retries
    ├── ModelUnavailableError  any other 503: the model is not loaded, loading, unloading, or the server is
    │                        shutting down; never retried (retrying soon does not fix it)
    ├── RequestTimeoutError  504 (the server's deadline passed) or the client's own timeout (status None)
    ├── ServerError          500 and any other 5xx: the server failed
    └── APIConnectionError   the server could not be reached (status None): retried until max_retries

Only ``OverloadedError`` and ``APIConnectionError`` are retried, with exponential backoff and jitter.
"""

from __future__ import annotations

import json


class DeepserveError(Exception):
    """Base class of every error the SDK raises."""

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message if status_code is None else f"{status_code}: {message}")
        self.message = message
        """The server's error message, or what went wrong on the client side."""
        self.status_code = status_code
        """The HTTP status, or ``None`` when no response was received."""
        self.retry_after = retry_after
        """Seconds the server asked to wait (``Retry-After``), if it said."""


class BadRequestError(DeepserveError):
    """400/413/415/422 (and other 4xx): malformed input, wrong tensor, bad parameter, payload too large."""


class InvalidParameterError(BadRequestError, ValueError):
    """A generation parameter outside the server's bounds, caught by the client before sending (``status_code``
    is ``None``): ``parameter`` and ``value`` name it."""

    def __init__(self, message: str, *, parameter: str, value: object) -> None:
        super().__init__(message)
        self.parameter, self.value = parameter, value


class NotFoundError(DeepserveError):
    """404: unknown model or version."""


class AuthenticationError(BadRequestError):
    """401 or 403: the API key is missing or wrong (``api_key`` / ``DEEPSERVE_API_KEY``), or the route is not
    open to this caller (model control without the admin key)."""


class OverloadedError(DeepserveError):
    """429, or a 503 with ``"code": "overloaded"``: the server is busy; retried."""


class ModelUnavailableError(DeepserveError):
    """503 other than overload: the model is not loaded or not ready, or the server is shutting down."""


class RequestTimeoutError(DeepserveError):
    """504 from the server, or the client's timeout expired (``status_code`` is then ``None``)."""


class ServerError(DeepserveError):
    """500 and other 5xx: the server failed while handling the request."""


class APIConnectionError(DeepserveError):
    """The server could not be reached (refused, reset, DNS failure)."""


OVERLOADED_CODE = "overloaded"
"""The body ``code`` of a 503 that means a full queue (the server sends ``model_unavailable`` for the other)."""


def error_class(status: int, code: str | None = None) -> type[DeepserveError]:
    """The exception class for an HTTP error status (and the body's ``code``, which splits the 503s)."""
    if status == 404:
        return NotFoundError
    if status == 429 or (status == 503 and code == OVERLOADED_CODE):
        return OverloadedError
    if status == 503:
        return ModelUnavailableError
    if status in (401, 403):
        return AuthenticationError
    if status == 504:
        return RequestTimeoutError
    if 400 <= status < 500:
        return BadRequestError
    return ServerError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form only); ``None`` when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: rare from an API server, fall back to our own backoff
    return max(0.0, seconds)


def error_code(body: bytes) -> str | None:
    """The ``code`` of a ``{"error": ..., "code": ...}`` body (also OpenAI's ``{"error": {"code"}}``), if any."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    code = payload.get("code")
    if code is None and isinstance(payload.get("error"), dict):
        code = payload["error"].get("code")
    return code if isinstance(code, str) else None


def error_message(body: bytes, reason: str) -> str:
    """The server's message from a ``{"error": "..."}`` body, else the body text, else the reason phrase."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500] or reason
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail"))
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])  # OpenAI-style {"error": {"message": ...}}
        if err is not None:
            return json.dumps(err)
    return text[:500] or reason


def error_from_response(status: int, body: bytes, reason: str, retry_after: str | None) -> DeepserveError:
    """Map an HTTP error response to the exception the SDK raises."""
    return error_class(status, error_code(body))(
        error_message(body, reason), status_code=status, retry_after=parse_retry_after(retry_after)
    )
