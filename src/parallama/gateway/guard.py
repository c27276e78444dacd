"""Client connections kept within bounds: how long a client may take to send a request's head,
how long it may leave its answer unread, and how many connections may be open at once.

aiohttp's server bounds only idle keep-alive time (`keepalive_timeout`), and by default for
an hour: 200 clients sending their headers a byte a second held 200 connections for as long as
they liked, and with a 1,024 file limit, 1,100 of them took every descriptor. Each connection
is therefore wrapped in a `Guard`, a protocol between the transport and aiohttp's own that
passes everything through and keeps these deadlines with one timer each, armed only while a
deadline runs (nginx's `client_header_timeout` and `send_timeout`). The gateway tells the guard
when a request's head has arrived and when its answer has been written whole (a request between
the two is not idle, however long it takes). The time to send a body is bounded where the body
is read (`gateway.app`), since only the reader knows where a body ends.

Past `max_connections`, a new connection gets a `Refusal`: a 503 with `Retry-After` at once,
and a clean close (the write side first, so the answer is not lost to a reset), rather than a
reset or a wait.
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
    first, as Go's runtime does; unlike Go, engines that `parallama up` starts later inherit the
    raised limit). Fewer than `wanted` is said in the log."""
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
        self.guards = 0  # made, not yet lost: counted when made, as a burst is accepted at once
        self.refusing = 0  # refusals not yet closed (they hold descriptors too)
        self.refused = 0
        self.timeouts: Counter[Phase] = Counter()

    def factory(self, handlers: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for the listening socket: aiohttp's handler behind a guard, or
        a refusal when the connections are at their limit."""

        def connection() -> asyncio.Protocol:
            if self.guards >= self.limits.max_connections:
                self.refused += 1
                return Refusal(self)
            self.guards += 1
            return Guard(handlers(), self)

        return connection

    def request_began(self, transport: asyncio.BaseTransport | None) -> None:
        """The request's head has arrived (the gateway's middleware saw it)."""
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.head_arrived()

    def request_ended(self, transport: asyncio.BaseTransport | None, *, body_read: bool) -> None:
        """Its answer has been written whole. With its body unread (an early error), aiohttp
        reads the rest for a while and closes the connection: no next request to wait for."""
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.answered(next_request=body_read)


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
        self._unsent = 0  # written bytes the client had not taken when the send timer was set
        self.idle = True  # waiting for a request's head, not answering one

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
        self._connections.guards -= 1
        self._cancel_timers()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """The client is not reading what it was sent as fast as it comes."""
        self._watch_sending()
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._send_timer is not None:  # it read enough to make room: progress
            self._send_timer.cancel()
            self._send_timer = None
        self._inner.resume_writing()

    # -- the gateway's side ---------------------------------------------------------------------

    def head_arrived(self) -> None:
        """The deadline is dropped, not its timer: on a busy keep-alive connection one timer
        then serves many requests, instead of one armed and cancelled per request."""
        self.idle = False
        self._head_deadline = None

    def answered(self, *, next_request: bool) -> None:
        """The answer is written (to the transport: the client may not have read it yet)."""
        self.idle = next_request
        self._watch_sending()  # what is left unsent must still go, within send_timeout

    # -- the deadlines --------------------------------------------------------------------------

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
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._connections.timeouts["head"] += 1
        limit = self._connections.limits.header_timeout
        message = f"the request's head did not arrive within {limit:g} s"
        transport.write(_answer(b"408 Request Timeout", message))
        transport.close()

    def _watch_sending(self) -> None:
        """While written bytes wait for the client, it must take some of them every
        `send_timeout` seconds (nginx's send_timeout, between two successive writes)."""
        transport = self._transport
        if self._send_timer is None and transport is not None:
            self._unsent = transport.get_write_buffer_size()
            if self._unsent:
                limit = self._connections.limits.send_timeout
                self._send_timer = self._loop.call_later(limit, self._send_timer_rang)

    def _send_timer_rang(self) -> None:
        self._send_timer = None
        transport = self._transport
        if transport is None:
            return
        unsent = transport.get_write_buffer_size()
        if unsent < self._unsent:  # it took some: another period for the rest
            self._watch_sending()
        elif unsent:
            # Not a byte taken: its answer would wait in our buffers for ever, and a closing
            # transport would wait for it to flush. (The backend's slot frees with it.)
            self._connections.timeouts["send"] += 1
            transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None


# Refusals open at once: past it, a connection is closed as soon as it is accepted (a flood must
# not take the descriptors that the refusals were to save).
_MAX_REFUSING = 64
_REFUSAL_LINGER = 2.0  # seconds a refused client has to read its 503 and close


class Refusal(asyncio.Protocol):
    """A connection past the limit: answered 503 at once, then closed.

    The answer goes before the request is read, and the writing side is closed first: closing
    with the client's request unread would send a reset, which can destroy the answer in flight.
    What the client still sends is read and dropped until it closes, or for a short while."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self._connections
        transport = cast(asyncio.Transport, transport)
        if connections.refusing >= _MAX_REFUSING:
            transport.abort()
            return
        connections.refusing += 1
        limit = connections.limits.max_connections
        message = f"too many open connections (the limit is {limit}): try again in 1 s"
        transport.write(_answer(b"503 Service Unavailable", message, b"Retry-After: 1\r\n"))
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        """Its request, read and dropped."""

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._connections.refusing -= 1


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
