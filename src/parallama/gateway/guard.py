"""Client connections kept within bounds: how long a client may take to send a request's head,
how long it may leave its answer unread, and how many connections may be open at once.

aiohttp's server bounds only idle keep-alive time (`keepalive_timeout`), and by default for
an hour: 200 clients sending their headers a byte a second held 200 connections for as long as
they liked, and with a 1,024 file limit, 1,100 of them took every descriptor. Each connection
is therefore wrapped in a `Guard`, a protocol between the transport and aiohttp's own that
passes everything through and keeps these deadlines with one timer each, armed only while a
deadline runs (nginx's `client_header_timeout` and `send_timeout`). The time to send a body is
bounded where the body is read (`gateway.app`), since only the reader knows where a body ends.

Past `max_connections`, a new connection gets a `Refusal`: a 503 with `Retry-After` as soon as
its client speaks, and a clean close (the write side first, so the answer is not lost to a
reset), rather than a reset or a wait.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import orjson
from aiohttp import web

Phase = Literal["head", "send"]
log = logging.getLogger("parallama.gateway")
# Descriptors kept for everything but client connections: listening sockets, logs, probes.
_RESERVED_FILES = 64


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds from connecting, or from a request's first byte, to its head
    send_timeout: float  # seconds a client may leave written answer bytes unread
    max_connections: int  # open client connections; more are refused


def usable_connections(wanted: int) -> int:
    """How many client connections can really be open: each proxied request holds a client
    connection and a backend one, so at most half the file limit (raised to its hard limit
    first, as Go's runtime does). Fewer than `wanted` is said in the log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # some systems refuse an infinite soft limit: keep the one we have
    if soft == resource.RLIM_INFINITY:
        return wanted
    usable = max(1, (soft - _RESERVED_FILES) // 2)
    if usable < wanted:
        log.warning(
            "max_connections lowered to fit the file limit",
            extra={"fields": {"max_connections": usable, "wanted": wanted, "file_limit": soft}},
        )
        return usable
    return wanted


def _answer(status: bytes, message: str, headers: bytes = b"") -> bytes:
    """A whole HTTP answer that closes the connection, with Ollama's `{"error": ...}` body (the
    route is not known before the request is read)."""
    body = orjson.dumps({"error": message})
    return (
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n%s\r\n%s" % (status, len(body), headers, body)
    )


class Connections:
    """The open client connections, their limits, and what the guards did (for `/metrics`)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: dict[asyncio.BaseTransport, Guard] = {}
        self.refused = 0
        self.timeouts: Counter[Phase] = Counter()

    def factory(self, handlers: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for the listening socket: aiohttp's handler behind a guard, or
        a refusal when the connections are at their limit."""

        def connection() -> asyncio.Protocol:
            if len(self.open) >= self.limits.max_connections:
                self.refused += 1
                return Refusal(self.limits)
            return Guard(handlers(), self)

        return connection

    def request_began(self, transport: asyncio.BaseTransport | None) -> None:
        """The request's head has arrived (the gateway's middleware saw it)."""
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.head_arrived()

    def request_ended(self, transport: asyncio.BaseTransport | None) -> None:
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.idle = True


class Guard(asyncio.Protocol):
    """aiohttp's protocol for one connection, with deadlines on the client around it."""

    def __init__(self, inner: asyncio.Protocol, connections: Connections) -> None:
        self._inner = inner
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._head_deadline: float | None = None  # while a request's head is awaited
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self.idle = True  # no request between its head and the end of its answer

    # -- asyncio.Protocol, passed through -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.open[transport] = self
        self._arm_head_timer()  # a connection that never sends a request is closed too
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.idle and self._head_deadline is None:
            self._arm_head_timer()  # the first byte of the next request on this connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._connections.open.pop(self._transport, None)
        self._cancel_timers()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """The client is not reading what it was sent: it has `send_timeout` to resume."""
        if self._send_timer is None:
            limit = self._connections.limits.send_timeout
            self._send_timer = self._loop.call_later(limit, self._too_slow, "send")
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._inner.resume_writing()

    # -- the deadlines --------------------------------------------------------------------------

    def head_arrived(self) -> None:
        """The deadline is dropped, not its timer: on a busy keep-alive connection one timer
        then serves many requests, instead of one armed and cancelled per request."""
        self.idle = False
        self._head_deadline = None

    def _arm_head_timer(self) -> None:
        self._head_deadline = self._loop.time() + self._connections.limits.header_timeout
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(self._head_deadline, self._head_timer_rang)

    def _head_timer_rang(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or not self.idle:
            return  # the head came in time
        if self._loop.time() < deadline:  # a later request's head: wait for its deadline
            self._head_timer = self._loop.call_at(deadline, self._head_timer_rang)
            return
        self._too_slow("head")

    def _too_slow(self, phase: Phase) -> None:
        """A deadline passed: count it and close. A client slow with its head gets a 408 first
        (if it is reading at all); one that stopped reading its answer is cut off at once."""
        transport = self._transport
        if phase == "send":
            self._send_timer = None
        if transport is None or transport.is_closing():
            return
        self._connections.timeouts[phase] += 1
        if phase == "head":
            limit = self._connections.limits.header_timeout
            message = f"the request's head did not arrive within {limit:g} s"
            transport.write(_answer(b"408 Request Timeout", message))
            transport.close()
        else:
            transport.abort()  # its unread answer would wait forever in our buffers

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None


class Refusal(asyncio.Protocol):
    """A connection past the limit: answered 503 when its client speaks, then closed."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # However it behaves, it goes within the head deadline.
        self._timer = asyncio.get_running_loop().call_later(
            self._limits.header_timeout, self._transport.abort
        )

    def data_received(self, data: bytes) -> None:
        """Answer once, close the writing side, and read on until the client closes: closing
        with its request unread would send a reset, which can destroy the answer in flight."""
        transport = self._transport
        if self._answered or transport is None:
            return
        self._answered = True
        limit = self._limits.max_connections
        message = f"too many open connections (the limit is {limit}): try again in 1 s"
        transport.write(_answer(b"503 Service Unavailable", message, b"Retry-After: 1\r\n"))
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class GuardedSite(web.BaseSite):
    """aiohttp's TCP site, with every connection behind a `Guard`."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, connections: Connections
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._connections = connections

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The bound port (the one the system chose, when 0 was asked for)."""
        server = cast(asyncio.Server, self._server)  # uvloop's is no subclass
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server
        assert handlers is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.factory(handlers), self._host, self._port, reuse_address=True
        )
