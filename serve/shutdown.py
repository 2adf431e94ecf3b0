"""Connections and shutdown on top of uvicorn: what its protocols and server do not offer themselves.

- **Draining.** On SIGTERM uvicorn stops accepting, lets requests in flight finish (``--graceful-timeout-s``) and
  closes idle keep-alive connections at once, so a client that sends its next request on one just then gets a
  reset. Here the app is told first (``DeepServeApp.draining``: new requests get 503 with ``Connection: close``,
  which uvicorn honours by closing after the answer), and idle connections stay open, answering that way,
  until the last request in flight has finished and at least ``DRAIN_LINGER_S``; then they close.
- **Exit status.** uvicorn re-raises the signal after a graceful shutdown, so the process dies "killed by
  SIGTERM"; ``serve`` exits 0 after a clean drain instead (``run_server``), 1 when requests had to be cancelled.
- **Slow headers.** uvicorn times out idle keep-alive connections (``--keep-alive-s``) but never a client that
  sends a request's headers slowly, or nothing at all after connecting. Such a connection is answered 408 and
  closed once ``--header-timeout-s`` has passed without complete headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import importlib.util
import os
import signal
import socket
import struct
import sys
from typing import Any

import uvicorn

DEFAULT_KEEP_ALIVE_S = 75.0
"""Idle keep-alive timeout: longer than load balancers' usual 60 s, so the balancer, not the server, closes an
idle connection (a server closing first races the balancer's next request: the classic source of 502s)."""
DEFAULT_HEADER_TIMEOUT_S = 20.0
MAX_QUEUED_ANSWERED = 1024
"""Most connections taken from the accept queue at shutdown (see ``DrainingServer._answer_accept_queue``)."""
DRAIN_LINGER_S = 0.5
"""How long idle connections stay open after SIGTERM at the least (see ``_DrainingMixin.shutdown``)."""
_PROTOCOLS = {"h11": ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
              "httptools": ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")}
_TIMEOUT_BODY = b'{"error": "request headers not received in time (--header-timeout-s)"}'
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(_TIMEOUT_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _TIMEOUT_BODY)


class _DrainingMixin:
    """Over a uvicorn HTTP protocol (same attributes in its h11 and httptools implementations)."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    _draining = False
    _lingered = False
    _linger_timer: asyncio.TimerHandle | None = None

    def busy(self) -> bool:
        """A request is being answered on this connection."""
        cycle = self.cycle  # type: ignore[attr-defined]
        return cycle is not None and not cycle.response_complete

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        before = self.cycle  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before or self.busy():  # type: ignore[attr-defined]
            self._disarm_header_timer()  # a request's headers are complete
        elif self._header_timer is None:
            self._arm_header_timer()  # the first bytes of a request: its headers must follow in time

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)  # type: ignore

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if not self.busy() and not transport.is_closing():
            transport.write(_TIMEOUT_RESPONSE)
            transport.close()

    def shutdown(self) -> None:
        self._draining = True
        cycle = self.cycle  # type: ignore[attr-defined]
        if self.busy() and not cycle.response_started:
            super().shutdown()  # type: ignore[misc]  # its answer says Connection: close, then it closes
            return
        # Idle, or its answer already started without Connection: close (the client may send its next request
        # on it): stay open while others drain, and at least DRAIN_LINGER_S, so that the next request is
        # answered 503 + Connection: close rather than meeting a closed socket (a reset)
        self._linger()

    def _linger(self) -> None:
        """Stay open at least ``DRAIN_LINGER_S`` more (then close once nothing is busy)."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._lingered = False
        self._linger_timer = self.loop.call_later(DRAIN_LINGER_S, self._linger_over)  # type: ignore[attr-defined]

    def _linger_over(self) -> None:
        self._lingered = True
        self._close_idle_when_drained()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._draining:
            if not self.transport.is_closing():  # type: ignore[attr-defined]
                self._linger()  # an answer sent without Connection: close: its client may send another request
            self._close_idle_when_drained()

    def _close_idle_when_drained(self) -> None:
        connections = list(self.connections)  # type: ignore[attr-defined]
        if any(c.busy() for c in connections):
            return  # the last response to complete closes them
        for c in connections:
            if c._draining and c._lingered and not c.busy() and not c.transport.is_closing():
                super(_DrainingMixin, c).shutdown()  # type: ignore[misc]


def draining_protocol(http: str, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> type[asyncio.Protocol]:
    """uvicorn's ``http`` ("h11" | "httptools" | "auto", as uvicorn picks it) protocol with draining and the
    slow-header timeout."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    module, name = _PROTOCOLS[http]
    base = getattr(importlib.import_module(module), name)
    return type(f"Draining{name}", (_DrainingMixin, base), {"header_timeout_s": header_timeout_s})


# Classic BPF on a listening TCP socket (it sees the TCP header): drop a segment whose flags are SYN without ACK.
_DROP_NEW_SYNS = [(0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02), (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
_SO_ATTACH_FILTER = 26


def stop_new_connections(sock: socket.socket) -> None:
    """Linux: the listener completes no new handshake from now on (a client's SYN goes unanswered, then meets
    the closed port), while what its accept queue holds stays: so a drain that empties the queue and closes it
    resets nothing, however fast clients connect. Elsewhere, or where refused, only the closing window remains."""
    if sys.platform != "linux" or sock.type != socket.SOCK_STREAM:
        return
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _DROP_NEW_SYNS))
    program = struct.pack("HL", len(_DROP_NEW_SYNS), ctypes.addressof(code))  # the kernel copies it
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)


class DrainingServer(uvicorn.Server):
    """Tells the app it is draining the moment the signal arrives (``app.draining``), before uvicorn's main loop
    notices it on its next tick. ``owns_listeners``: the socket is this server's alone, so its drain may stop
    it taking new connections (a worker's is shared with the ones that replace it)."""

    owns_listeners = True

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.deepserve_app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.deepserve_app.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._answer_accept_queue()
        await super().shutdown(sockets)

    async def _answer_accept_queue(self) -> None:
        """Close the listeners without resetting what waits in their accept queues: closing a listening socket
        makes the kernel reset every connection it completed but the server had not accepted yet, whose clients
        have sent a request. Each is accepted instead (the app, draining, answers it 503 + Connection: close),
        until the queue is empty; the listener closes right then, with no await in between."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:  # what uvicorn's own listeners create per connection
            return self.config.http_protocol_class(config=self.config, server_state=self.server_state,  # type: ignore
                                                   app_state=self.lifespan.state, _loop=loop)

        for server in self.servers:
            listeners = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
            server.close()  # the loop stops accepting; the duplicates keep the queues open
            for listener in listeners:
                if self.owns_listeners:
                    stop_new_connections(listener)
                listener.setblocking(False)
                for _ in range(MAX_QUEUED_ANSWERED):  # bounded: clients that reconnect at once do not hold it
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    await loop.connect_accepted_socket(factory, conn)
                listener.close()


def _after_drain(sig: int, frame: Any) -> None:
    """What uvicorn re-raises the signal into once it has shut down gracefully: nothing more to do."""


def run_server(server: DrainingServer) -> int:
    """Serve until SIGTERM/SIGINT; the exit status: 0 after a clean drain, 1 if the server never started or
    requests in flight had to be cancelled at the graceful timeout."""
    # uvicorn restores the handlers it found and re-raises the signal it shut down for: let that be a no-op
    previous = {sig: signal.signal(sig, _after_drain) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started and server.deepserve_app.aborted == 0 else 1
