"""Client connections within bounds: the limits each connection keeps (`server.py` keeps them),
how many may be open at once, and the clean refusal past that.

Without deadlines on the client, 200 clients sending their headers a byte a second held 200
connections for as long as they liked, and with a 1,024 file limit, 1,100 of them took every
descriptor. Past `max_connections`, a new connection gets a `Refusal`: a 503 with `Retry-After`
at once, and a clean close (the write side first, so the answer is not lost to a reset), rather
than a reset or a wait (`server.Refusal`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Protocol

Phase = Literal["head", "send"]
log = logging.getLogger("parallama.gateway")
# Descriptors kept for everything but client connections: listening sockets, logs, probes.
_RESERVED_FILES = 64


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds from connecting, or from a request's first byte, to its head
    send_timeout: float  # seconds a client may leave written answer bytes unread
    max_connections: int  # open client connections; more are refused
    body_timeout: float = 60.0  # seconds a client may pause while sending a body
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for its next request
    max_body_bytes: int = 16 * 1024 * 1024
    # Targets whose bodies are streamed to their handler, never held, so not held to
    # `max_body_bytes` (model blobs: gigabytes).
    streamed_prefixes: tuple[bytes, ...] = ()


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


class Closable(Protocol):
    """A client connection, which can be asked to close once its answer is written."""

    def close_when_answered(self) -> None: ...


class Connections:
    """The open client connections, their limits, and what the limits did (for `/metrics`)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: dict[asyncio.BaseTransport, Closable] = {}
        self.accepted = 0  # made, not yet lost: counted when made, as a burst is accepted at once
        self.refusing = 0  # refusals not yet closed (they hold descriptors too)
        self.refused = 0
        self.timeouts: Counter[Phase] = Counter()
        # Stopping: each connection closes once its answer is written, and this is told when
        # none is left.
        self.draining = False
        self._none_open: asyncio.Future[None] | None = None

    def closed(self) -> None:
        """An accepted connection is gone."""
        self.accepted -= 1
        if self._none_open is not None and not self.open and not self._none_open.done():
            self._none_open.set_result(None)

    async def drain(self) -> None:
        """Close every connection once its answer is written (idle ones now); return when none
        is open. New answers say `Connection: close`."""
        self.draining = True
        self._none_open = asyncio.get_running_loop().create_future()
        for connection in list(self.open.values()):
            connection.close_when_answered()
        if self.open:
            await self._none_open
