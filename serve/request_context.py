"""Request ids and the server's log format.

Every request has an id: the client's ``X-Request-Id`` when it is a valid one, else a new one. It is echoed
as ``X-Request-Id`` on the answer and carried by every log record written while the request is handled (a
context variable, so tasks the request starts inherit it), which ties an answer such as "inference failed; the
details are in the log" to the log lines holding those details. ``configure_logging`` writes text or JSON lines
(``--log-format``), both with the request id.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import re
from contextvars import ContextVar
from typing import Iterable

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_VALID_ID = re.compile(r"[A-Za-z0-9._:+=@/-]{1,%d}" % MAX_REQUEST_ID_LENGTH)
"""Printable, no spaces or quotes: ids land in log lines and headers verbatim."""
NO_REQUEST = "-"

current_request_id: ContextVar[str] = ContextVar("deepserve_request_id", default=NO_REQUEST)
"""The id of the request being handled; ``NO_REQUEST`` outside requests (startup, the batcher's own loop)."""


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


_ID_PREFIX = os.urandom(6).hex()
_next_id = itertools.count(1)


def new_request_id() -> str:
    """Unique per process (a random prefix drawn at start, then a counter): a uuid4 per request cost 10% of an
    overloaded server's CPU (an os.urandom call each)."""
    return f"{_ID_PREFIX}{next(_next_id):012x}"


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str | None]:
    """``(id, problem)`` from raw ASGI headers: the client's valid ``X-Request-Id``, or a new id and, when the
    client sent an invalid one, the problem to answer with a 400."""
    for name, value in headers:
        if name == b"x-request-id":  # ASGI header names are lower-case
            text = value.decode("latin-1")
            if _VALID_ID.fullmatch(text):
                return text, None
            return new_request_id(), (f"header X-Request-Id must be 1 to {MAX_REQUEST_ID_LENGTH} characters of "
                                      f"letters, digits and ._:+=@/-, got {text[:40]!r}")
    return new_request_id(), None


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` on every record (``-`` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, log_format: LogFormat | str = LogFormat.TEXT) -> None:
    """One stderr handler on the root logger, in ``log_format``, every record carrying its request id, unless the
    root logger has handlers already. uvicorn's loggers propagate to it (the server runs with ``log_config=None``)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if LogFormat(log_format) is LogFormat.JSON:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                                           rename_fields={"asctime": "time", "levelname": "level",
                                                          "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # basicConfig: a no-op where logging is already set up (a test process running the CLI in process keeps its own)
    logging.basicConfig(level=level.upper(), handlers=[handler])
