"""Errors a request can end with. Each maps to one HTTP status and a body ``{"error": "..."}``
(the KServe v2 error shape); the app installs one handler for ``ServeError``."""

from __future__ import annotations

import re


class ServeError(Exception):
    """Base class: ``status`` is the HTTP status; ``headers`` extra response headers."""

    status: int = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ServeError):
    """Malformed body, wrong input name/shape/dtype, invalid parameter, cap exceeded."""

    status = 400


class NotFound(ServeError):
    """Unknown model or version."""

    status = 404


class NotReady(ServeError):
    """The model exists but is not ready (failed to load, or still warming up)."""

    status = 503


class PayloadTooLarge(ServeError):
    status = 413


class UnsupportedMediaType(ServeError):
    status = 415


class Overloaded(ServeError):
    """The queue is full: try again after ``retry_after_s`` seconds."""

    status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0, status: int = 429) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after_s)))})
        self.status = status
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it could be (fully) served."""

    status = 504


class ShuttingDown(ServeError):
    status = 503

    def __init__(self, message: str = "server is shutting down") -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class InferenceFailed(ServeError):
    """The model raised while running a batch: the server's fault, reported to the requests in that batch.

    The answer names the problem in the user's terms; ``detail`` (the runtime's own text, which may hold
    source paths) goes to the log only, under the request id."""

    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__("inference failed inside the server; its log has the details under this response's "
                         "X-Request-Id")
        self.detail = detail


_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~])/(?:[^\s/:'"()\[\]]+/)+([^\s/:'"()\[\]]*)""")


def redact_paths(text: str, root: str | None = None) -> str:
    """``text`` without filesystem paths, for answers: paths below ``root`` become relative to it, any other
    absolute path is cut to its last part (``/opt/x/model.onnx`` -> ``model.onnx``)."""
    if root:
        text = text.replace(root.rstrip("/") + "/", "").replace(root.rstrip("/"), ".")
    return _ABSOLUTE_PATH.sub(r"\1", text)
