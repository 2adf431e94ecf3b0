"""Errors a request can end with. Each maps to one HTTP status and a body ``{"error": "..."}``
(the KServe v2 error shape); the app installs one handler for ``ServeError``."""

from __future__ import annotations

import re


class ServeError(Exception):
    """Base class: ``status`` is the HTTP status; ``headers`` extra response headers."""

    status: int = 500
    code: str | None = None
    """A machine-readable kind, sent as the body's ``code`` where it matters to clients (retry or not)."""
    reject_reason: str | None = None
    """For a request refused by a limit: the reason it is counted under (``deepserve_rejected_requests``)."""

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


class Conflict(ServeError):
    """The request cannot apply in the server's current setup (e.g. model control with several workers)."""

    status = 409


class NotReady(ServeError):
    """The model exists but is not ready (failed to load, still warming up, unloading or unloaded): a 503 that
    retrying soon does not fix, unlike ``Overloaded``."""

    status = 503
    code = "model_unavailable"


class PayloadTooLarge(ServeError):
    status = 413
    reject_reason = "body_too_large"


class LimitExceeded(BadRequest):
    """A request over one of the server's caps (prompt length, new tokens): counted under ``reason``."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reject_reason = reason


class ImageTooLarge(BadRequest):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""

    reject_reason = "image_pixels"


class UnsupportedMediaType(ServeError):
    status = 415


class Overloaded(ServeError):
    """The queue is full: try again after ``retry_after_s`` seconds."""

    status = 429
    code = "overloaded"

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

class Unauthorized(ServeError):
    """No valid API key: 401 with ``WWW-Authenticate: Bearer`` (clients, the playground, ask for a key)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServeError):
    """A valid caller that may not use this route (model control without the admin key, or off loopback)."""

    status = 403
    code = "forbidden"


class LoadFailed(ServeError):
    """A model load (or reload) failed; whatever served before still serves."""

    status = 400
    code = "load_failed"
