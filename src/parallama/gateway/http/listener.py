"""The gateway's listening sockets, and every connection the kernel holds taken at each wakeup.

libuv, under uvloop, accepts one connection per turn of the event loop (since libuv 1.45). A
gateway busy relaying a thousand streams turns its loop every few milliseconds, so a burst of
clients sat in the listen queue for seconds although the kernel had completed their handshakes
at once (measured: 676 connections queued, drained over 2.5 s, while the clients' connects had
returned within 43 ms). Here the loop only watches the socket; each time it is readable up to
`_BATCH` connections are accepted and handed to the loop as accepted sockets, as asyncio's own
loop does (up to its backlog) and nginx's `multi_accept on`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("parallama.gateway")

# Connections accepted per wakeup: a whole burst, yet a bound on one callback's work.
_BATCH = 1024
# Out of file descriptors: stop accepting this long (asyncio's own delay), else the loop spins
# on a socket that stays readable. The connections wait in the kernel's queue meanwhile.
_RETRY_SECONDS = 1.0
_SKIPPED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})  # the client's, not ours


def listening_sockets(
    host: str, port: int, *, reuse_port: bool, backlog: int
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` names (all interfaces
    when it is empty), as `loop.create_server` binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # else binding "::" takes the IPv4 port too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(exc.strerror or str(exc)).lower()}",
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts on `sockets` for `protocol`'s connections; stands where `asyncio.Server` would
    (its `sockets`, `close`, `wait_closed`, `get_loop`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol: Callable[[], asyncio.Protocol],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._protocol = protocol
        self._handing: set[asyncio.Task[object]] = set()  # accepted, not yet made
        self._closed = False
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _SKIPPED:
                    continue
                log.warning(
                    "could not accept a connection: retrying in 1 s",
                    extra={"fields": {"error": exc.strerror or str(exc)}},
                )
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(_RETRY_SECONDS, self._resume, sock)
                return
            self._hand_over(connection)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _hand_over(self, connection: socket.socket) -> None:
        """The loop makes the transport and calls the protocol's `connection_made`; all of it
        happens before the coroutine's first wait, so the task costs a turn, not a round trip."""
        connection.setblocking(False)
        made = self._loop.connect_accepted_socket(self._protocol, connection)
        task: asyncio.Task[object] = self._loop.create_task(made)
        self._handing.add(task)
        task.add_done_callback(self._handed)

    def _handed(self, task: asyncio.Task[object]) -> None:
        self._handing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The client left before its transport was made: nothing to answer.
            log.debug(
                "a connection closed as it was accepted", extra={"fields": {"error": str(exc)}}
            )

    def close(self) -> None:
        """Stop accepting; connections accepted and not yet made are closed."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._handing:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._handing:
            await asyncio.gather(*self._handing, return_exceptions=True)
