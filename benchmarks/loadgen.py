"""A small asynchronous HTTP/1.1 load generator for loopback servers.

Why not httpx: on 2 cores the generator shares the CPU with the server under test, so every microsecond it
spends per request is taken from the server. Requests are encoded once, up front, and sent over raw asyncio
streams with keep-alive, one connection per concurrent worker (a closed loop: each worker sends its next
request when the previous answer is in), connected before its clock starts. Parsing reads only the status line,
``Content-Length`` / ``Transfer-Encoding: chunked`` and the body; streamed bodies (server-sent events) record the
arrival time of each event so that time to first token and time per output token can be measured.

A run is bounded twice: by ``duration_s`` (no request starts after it) and by ``max_requests``; requests
still in flight ``drain_s`` after the end are cancelled and counted as ``cancelled``. Only 127.0.0.1 /
localhost / ::1 are accepted as targets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LoadError(ValueError):
    """The load specification is invalid (bad field value, non-loopback host)."""


def _check(condition: bool, field_name: str, message: str, value: Any) -> None:
    if not condition:
        raise LoadError(f"{field_name} {message}, got {value!r}")


@dataclass(frozen=True)
class Request:
    """One HTTP request, encoded once and sent many times."""

    method: str
    """HTTP method, e.g. ``POST``."""
    path: str
    """Path and query, starting with ``/``."""
    body: bytes = b""
    """Request body (may be empty)."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers; Host, Content-Length and Connection are added."""

    def __post_init__(self) -> None:
        _check(self.method.isalpha() and self.method.isupper(), "method", "must be an upper-case HTTP method",
               self.method)
        _check(self.path.startswith("/"), "path", "must start with '/'", self.path)

    def encode(self, host: str, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive",
                 f"Content-Length: {len(self.body)}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def json_request(path: str, payload: Any, headers: dict[str, str] | None = None) -> Request:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Request("POST", path, body, (("Content-Type", "application/json"), *(headers or {}).items()))


@dataclass(frozen=True)
class Response:
    """What the generator keeps of one answer."""

    status: int
    body: bytes
    """The whole body (for streams, the concatenated chunks)."""
    event_times: tuple[float, ...] = ()
    """Streams only: ``perf_counter`` arrival time of each server-sent event carrying data."""
    events: tuple[bytes, ...] = ()
    """Streams only: the ``data:`` payload of each event, in order (``[DONE]`` excluded)."""
    retry_after: str | None = None
    """The ``Retry-After`` header, if the answer had one."""


TokenCounter = Callable[[Response], int]
"""Output tokens in one successful response (0 when the scenario counts requests only)."""


@dataclass(frozen=True)
class LoadSpec:
    """One benchmark cell: what to send, how hard and for how long."""

    host: str
    """Target host; loopback only."""
    port: int
    """Target TCP port."""
    requests: tuple[Request, ...]
    """Requests sent round-robin (each worker starts at its own offset)."""
    concurrency: int
    """Concurrent workers, each with one keep-alive connection."""
    duration_s: float
    """No request starts after this many seconds of the measured phase."""
    max_requests: int
    """No more than this many measured requests start."""
    warmup_requests: int = 0
    """Requests sent before the clock starts (not recorded)."""
    drain_s: float = 10.0
    """How long requests in flight at the end may still take before they are cancelled."""
    timeout_s: float = 60.0
    """Per-request timeout; a request past it counts as a ``timeout`` error."""
    stream: bool = False
    """Parse the body as server-sent events and record when each one arrives."""

    def __post_init__(self) -> None:
        _check(self.host in LOOPBACK, "host", f"must be a loopback address {LOOPBACK}", self.host)
        _check(0 < self.port < 65536, "port", "must be a TCP port", self.port)
        _check(len(self.requests) >= 1, "requests", "must hold at least one request", len(self.requests))
        _check(self.concurrency >= 1, "concurrency", "must be >= 1", self.concurrency)
        _check(self.duration_s > 0, "duration_s", "must be > 0", self.duration_s)
        _check(self.max_requests >= 1, "max_requests", "must be >= 1", self.max_requests)
        _check(self.warmup_requests >= 0, "warmup_requests", "must be >= 0", self.warmup_requests)
        _check(self.drain_s >= 0, "drain_s", "must be >= 0", self.drain_s)
        _check(self.timeout_s > 0, "timeout_s", "must be > 0", self.timeout_s)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile (0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class LoadResult:
    """Outcome of one cell. Latencies are in seconds; rates per second of the measured phase."""

    elapsed_s: float = 0.0
    """From the first measured request's start to the last completion (or the drain deadline)."""
    ok: int = 0
    """Responses with a 2xx status."""
    errors: Counter = field(default_factory=Counter)
    """Failures by status code (``"503"``), ``"timeout"``, ``"cancelled"`` or the exception name."""
    latencies_s: list[float] = field(default_factory=list)
    """End-to-end latency of each successful request."""
    tokens: int = 0
    """Output tokens over all successful requests (from the scenario's token counter)."""
    ttft_s: list[float] = field(default_factory=list)
    """Streams: time to the first event of each successful request."""
    tpot_s: list[float] = field(default_factory=list)
    """Streams: (last event - first event) / (tokens - 1) of each request with at least 2 tokens."""
    refused_with_retry_after: int = 0
    """Failed answers (429, 503...) that carried a ``Retry-After`` header."""
    connect_s: list[float] = field(default_factory=list)
    """Closed loop: how long each connect took to return (the client's handshake, all at once on its loop) before
    the clock started; the server may not have accepted the connection yet."""

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain numbers for tables and JSON: rates, p50/p90/p99 in milliseconds, errors by kind."""

        def ms(values: list[float], q: float) -> float | None:
            p = percentile(values, q)
            return None if p is None else p * 1000.0

        return {
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": self.requests_per_s, "tokens_per_s": self.tokens_per_s,
            "p50_ms": ms(self.latencies_s, 50), "p90_ms": ms(self.latencies_s, 90), "p99_ms": ms(self.latencies_s, 99),
            "ttft_p50_ms": ms(self.ttft_s, 50), "ttft_p99_ms": ms(self.ttft_s, 99), "tpot_p50_ms": ms(self.tpot_s, 50),
        }


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects lazily after an error or ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass  # the peer already went away: the socket is closed either way
        self.reader = self.writer = None

    async def connect(self) -> float:
        """Open the connection now; the seconds it took."""
        t0 = time.perf_counter()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        return time.perf_counter() - t0

    async def send(self, raw: bytes, stream: bool) -> Response:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, header_block = head.decode("latin-1").partition("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_block.split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            response = await self._chunked(status, stream)
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            response = _stream_response(status, [(time.perf_counter(), body)]) if stream else Response(status, body)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if "retry-after" in headers:
            response = dataclasses.replace(response, retry_after=headers["retry-after"])
        return response

    async def _chunked(self, status: int, stream: bool) -> Response:
        assert self.reader is not None
        pieces: list[tuple[float, bytes]] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers are expected: the blank line
                break
            data = await self.reader.readexactly(size + 2)
            pieces.append((time.perf_counter(), data[:-2]))
        if stream:
            return _stream_response(status, pieces)
        return Response(status, b"".join(p for _, p in pieces))


def _stream_response(status: int, pieces: list[tuple[float, bytes]]) -> Response:
    """Split server-sent events across chunks; each event is stamped with the arrival of its last byte."""
    times: list[float] = []
    events: list[bytes] = []
    buffer = b""
    for arrived, data in pieces:
        buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if payload and payload != b"[DONE]":
                times.append(arrived)
                events.append(payload)
    return Response(status, b"".join(p for _, p in pieces), tuple(times), tuple(events))


def _frozen_heap(run: Callable[..., Awaitable[LoadResult]]) -> Callable[..., Awaitable[LoadResult]]:
    """A load run with the generator's own heap out of its collector's reach while it measures.

    The benchmark process holds torch, the exporter and every result so far: a full collection of that heap
    took 16-230 ms on 2 cores (timed with ``gc.callbacks``). It is rare, but one landing inside a cell stalls
    every client at once and reads as the server's tail. Frozen objects are skipped; what a run allocates is
    still collected as usual."""

    @functools.wraps(run)
    async def measured(*args: Any, **kwargs: Any) -> LoadResult:
        gc.collect()
        gc.freeze()
        try:
            return await run(*args, **kwargs)
        finally:
            gc.unfreeze()

    return measured


@_frozen_heap
async def run_load(spec: LoadSpec, count_tokens: TokenCounter | None = None) -> LoadResult:
    """Run one cell and return its measurements. Never raises for failed requests: they are counted."""
    encoded = [r.encode(spec.host, spec.port) for r in spec.requests]
    connections = [Connection(spec.host, spec.port) for _ in range(spec.concurrency)]
    result = LoadResult()
    try:
        # every connect returns before the clock: the client's TCP handshakes are off it. The server's accept and
        # protocol set-up of the connections are not (a connect returns once the kernel completed the handshake,
        # maybe still in the accept queue). One that failed is retried (and counted) by its request.
        opened = await asyncio.gather(*(c.connect() for c in connections), return_exceptions=True)
        result.connect_s = [s for s in opened if isinstance(s, float)]
        if spec.warmup_requests:
            await _phase(spec, encoded, connections, spec.warmup_requests, None, LoadResult(), count_tokens)
        await _phase(spec, encoded, connections, spec.max_requests, spec.duration_s, result, count_tokens)
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return result


def _record(result: LoadResult, response: Response, t0: float, count_tokens: TokenCounter | None) -> float:
    """Count one answer to a request sent at ``t0`` into ``result``; return when it was complete."""
    done = time.perf_counter()
    if 200 <= response.status < 300:
        result.ok += 1
        result.latencies_s.append(done - t0)
        tokens = count_tokens(response) if count_tokens else 0
        result.tokens += tokens
        if response.event_times:
            result.ttft_s.append(response.event_times[0] - t0)
            if tokens >= 2:
                result.tpot_s.append((response.event_times[-1] - response.event_times[0]) / (tokens - 1))
    else:
        result.errors[str(response.status)] += 1
        result.refused_with_retry_after += response.retry_after is not None
    return done


@_frozen_heap
async def run_open_loop(spec: LoadSpec, rate_per_s: float, count_tokens: TokenCounter | None = None) -> LoadResult:
    """Open loop: a request starts every ``1 / rate_per_s`` seconds whether or not earlier ones were answered (how
    overload arrives), on an idle keep-alive connection, at most ``spec.concurrency`` of them in flight (an arrival
    finding none free counts as ``"client-full"``). ``spec.warmup_requests`` is not used."""
    _check(rate_per_s > 0, "rate_per_s", "must be > 0", rate_per_s)
    encoded = [r.encode(spec.host, spec.port) for r in spec.requests]
    idle = [Connection(spec.host, spec.port) for _ in range(spec.concurrency)]
    every = [*idle]
    result = LoadResult()
    started = time.perf_counter()
    last_done = started

    async def one(raw: bytes, conn: Connection) -> None:
        nonlocal last_done
        t0 = time.perf_counter()
        try:
            response = await asyncio.wait_for(conn.send(raw, spec.stream), spec.timeout_s)
            last_done = max(last_done, _record(result, response, t0, count_tokens))
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            result.errors["timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__] += 1
            await conn.close()
        idle.append(conn)

    tasks: list[asyncio.Task] = []
    n = min(spec.max_requests, int(spec.duration_s * rate_per_s))
    for i in range(n):
        await asyncio.sleep(max(0.0, started + i / rate_per_s - time.perf_counter()))  # the arrival schedule
        if not idle:
            result.errors["client-full"] += 1
            continue
        tasks.append(asyncio.ensure_future(one(encoded[i % len(encoded)], idle.pop())))
    done, pending = await asyncio.wait(tasks, timeout=spec.drain_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        result.errors["cancelled"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in every))
    result.elapsed_s = max(last_done, started + n / rate_per_s) - started
    return result


async def _phase(spec: LoadSpec, encoded: list[bytes], connections: list[Connection], budget: int,
                 duration_s: float | None, result: LoadResult, count_tokens: TokenCounter | None) -> None:
    started = time.perf_counter()
    stop_at = None if duration_s is None else started + duration_s
    issued = 0
    last_done = started

    async def worker(index: int, conn: Connection) -> None:
        nonlocal issued, last_done
        position = index
        while issued < budget and (stop_at is None or time.perf_counter() < stop_at):
            issued += 1
            raw = encoded[position % len(encoded)]
            position += 1
            t0 = time.perf_counter()
            try:
                response = await asyncio.wait_for(conn.send(raw, spec.stream), spec.timeout_s)
            except asyncio.TimeoutError:
                result.errors["timeout"] += 1
                await conn.close()
                continue
            except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                result.errors[type(e).__name__] += 1
                await conn.close()
                continue
            last_done = max(last_done, _record(result, response, t0, count_tokens))

    tasks = [asyncio.ensure_future(worker(i, c)) for i, c in enumerate(connections)]
    limit = None if stop_at is None else max(0.0, stop_at - time.perf_counter()) + spec.drain_s
    done, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:  # still waiting on an answer after the drain: drop it, and its connection
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        result.errors["cancelled"] += len(pending)
        await asyncio.gather(*(c.close() for c in connections))
        last_done = time.perf_counter()
    for task in done:
        if task.exception() is not None:  # a bug in the generator itself, not a failed request
            raise task.exception()  # type: ignore[misc]
    result.elapsed_s = last_done - started
