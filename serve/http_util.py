"""HTTP helpers shared by the v2 and predictions routes: bounded body reading, content decoding, deadlines."""

from __future__ import annotations

import time
import zlib

from starlette.requests import Request

from deepserve.serve.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
TIMEOUT_HEADER = "x-request-timeout-ms"
"""Relative deadline of a request in milliseconds (v2 requests may use Triton's ``parameters.timeout``)."""


def body_limit(request: Request) -> int:
    return getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes (--max-body-mb)")


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past the configured limit (checked before reading when the length
    is declared, while streaming otherwise) and decompressed for ``Content-Encoding: gzip|deflate``."""
    limit = body_limit(request)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"Content-Length must be a number, got {declared!r}")
        if int(declared) > limit:
            raise _too_large(declared, limit)
        body = await request.body()
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"over {limit}", limit)
            chunks.append(chunk)
        body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"body is not valid {encoding} data: {e}") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise _too_large(f"over {limit} (decompressed)", limit)
    return out


def deadline_from(request: Request, timeout_us: object = None) -> float | None:
    """An absolute ``time.monotonic()`` deadline from the timeout header or Triton's ``timeout`` (µs)."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            ms = float(header)
        except ValueError:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be a number of milliseconds, got {header!r}") from None
        if ms <= 0:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be > 0, got {header!r}")
        return time.monotonic() + ms / 1000.0
    if timeout_us is not None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float)) or timeout_us < 0:
            raise BadRequest(f"parameters.timeout must be a non-negative number of microseconds, got {timeout_us!r}")
        if timeout_us > 0:  # Triton: 0 means no timeout
            return time.monotonic() + timeout_us / 1e6
    return None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
