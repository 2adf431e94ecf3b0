"""API keys, the admin key for model control, and CORS: the gate every HTTP request passes before routing.

Route families:

- open: health and readiness (``/v2/health/*``, ``/v2/models/{m}[/versions/{v}]/ready``), the API docs, the
  playground page and its assets, and ``/metrics`` unless ``--metrics-auth``;
- model control (``/v2/repository/...``): the admin key when one is set; without one, loopback clients only
  (and the API key, when one is set);
- everything else: an API key (or the admin key) when keys are set.

Clients send ``Authorization: Bearer <key>``. A missing or wrong key is answered 401 with
``WWW-Authenticate: Bearer`` and a JSON error; keys are compared in constant time and never logged. A key file
holds one key per line (``#`` comments and blank lines ignored) and is re-read when it changes, so keys rotate
by editing it.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from deepserve.serve.errors import Forbidden, ServeError, Unauthorized
from deepserve.serve.http_util import error_response

log = logging.getLogger("deepserve.serve")


class ApiKeyFileError(ValueError):
    """The key file cannot be read or holds no key; the message names the file."""


class Family(enum.Enum):
    OPEN = "open"
    API = "api"
    ADMIN = "admin"
    METRICS = "metrics"


_OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                         "/openapi.json"})
_OPEN_PREFIXES = ("/playground/", "/docs-assets/")
"""Pages for people and their static files (the browser playground at ``/``, which asks for a key when the
API answers 401): they hold no data."""
_MODEL_READY = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")


def family(path: str) -> Family:
    """Which rules guard ``path``."""
    if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES) or _MODEL_READY.match(path):
        return Family.OPEN
    if path.startswith("/v2/repository/") or path == "/v2/repository":
        return Family.ADMIN
    if path == "/metrics":
        return Family.METRICS
    return Family.API


def read_key_file(path: Path) -> list[str]:
    """The keys in ``path``, one per line; ``ApiKeyFileError`` naming the file when it has none or is unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyFileError(f"API key file {path}: cannot read it ({type(e).__name__})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ApiKeyFileError(f"API key file {path} holds no key (one key per line)")
    return keys


class KeySet:
    """Keys given directly, and those of a key file (re-read when its size, time or inode changes)."""

    def __init__(self, keys: Iterable[str] = (), file: Path | str | None = None) -> None:
        self.fixed = [k.encode() for k in keys if k]
        self.file = Path(file) if file is not None else None
        self._stamp: tuple | None = None
        self._read = False
        self._read_ns = 0
        self._from_file: list[bytes] = []
        if self.file is not None:
            self._refresh()

    def __bool__(self) -> bool:
        return bool(self.fixed) or self.file is not None

    def _refresh(self) -> None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except OSError:
            st = None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None
        # A file changed within a second of our last read may have changed again without a new time stamp
        # (file systems keep time in ticks): read it again until its last change is older than that.
        racy = st is not None and st.st_mtime_ns >= self._read_ns - 1_000_000_000
        if self._read and stamp == self._stamp and not racy:
            return
        try:
            self._from_file = [k.encode() for k in read_key_file(self.file)]
            log.info("API keys read from %s: %d key(s)", self.file, len(self._from_file))
        except ApiKeyFileError as e:  # keep the keys we had: a half-written file must not lock everyone out
            if not self._read:
                raise
            log.warning("%s; keeping the %d key(s) read before", e, len(self._from_file))
        self._read, self._stamp, self._read_ns = True, stamp, time.time_ns()

    def matches(self, token: str) -> bool:
        """Whether ``token`` is one of the keys, compared in constant time against every key."""
        if self.file is not None:
            self._refresh()
        candidate = token.encode()
        found = False
        for key in (*self.fixed, *self._from_file):
            found |= hmac.compare_digest(candidate, key)
        return found


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


@dataclass
class AccessPolicy:
    api_keys: KeySet
    admin_keys: KeySet
    metrics_auth: bool = False

    @classmethod
    def open(cls) -> AccessPolicy:
        """No keys: every route open, model control on loopback only."""
        return cls(KeySet(), KeySet())

    def check(self, scope: Scope) -> None:
        """Raise ``Unauthorized`` / ``Forbidden`` unless the request may reach its route."""
        path = scope["path"]
        if not path.startswith("/v2/repository") and not (self.api_keys or self.admin_keys):
            return  # no keys: only model control is guarded (skips family's regex on every request)
        kind = family(path)
        if kind is Family.OPEN or (kind is Family.METRICS and not self.metrics_auth):
            return
        token = bearer_token(scope)
        if kind is Family.ADMIN:
            if self.admin_keys:
                self._require(token, self.admin_keys, None, "an admin API key (--admin-api-key)")
                return
            if not is_loopback(scope):
                raise Forbidden("model control answers only on loopback when the server has no --admin-api-key; "
                                "set one to control models from elsewhere")
        if self.api_keys:
            self._require(token, self.api_keys, self.admin_keys, "an API key")

    @staticmethod
    def _require(token: str | None, keys: KeySet, also: KeySet | None, what: str) -> None:
        if token is None:
            raise Unauthorized(f"this route needs {what}: send the header 'Authorization: Bearer <key>'")
        if not (keys.matches(token) or (also is not None and also and also.matches(token))):
            raise Unauthorized(f"the key sent is not valid; this route needs {what}")


class AuthGate:
    """ASGI middleware answering refused requests itself (and counting them by reason)."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, reject: Callable[[str], None]) -> None:
        self.app = app
        self.policy = policy
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self.policy.check(scope)
            except ServeError as e:
                self.reject("forbidden_not_loopback" if isinstance(e, Forbidden) else
                            "missing_api_key" if bearer_token(scope) is None else "invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)
