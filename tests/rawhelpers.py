"""A hand-written HTTP server on loopback, for what real backends do only now and then: drop a
connection after reading a request, stream without end, die after a first chunk, answer badly.

`raw_backend(answer)` reads each request whole (head, and a Content-Length body) and hands it
to `answer`, which writes whatever bytes the scenario needs; what the server saw is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RawRequest:
    n: int  # its place on its connection, from 1
    head: bytes  # the request line and headers, up to and with the blank line
    body: bytes

    @property
    def line(self) -> bytes:
        """The request line, e.g. b"POST /api/chat HTTP/1.1"."""
        return self.head.split(b"\r\n", 1)[0]

    @property
    def is_probe(self) -> bool:
        """A GET: the gateway's probes and listings, not a request a client sent."""
        return self.head.startswith(b"GET")


# Writes its answer to the request; False ends the connection (None or True: the next request).
Answer = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[bool | None]]


@dataclass
class RawBackend:
    url: str
    connections: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each request arrived (monotonic)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a connection has ended


async def read_request(reader: asyncio.StreamReader, n: int) -> RawRequest:
    """The next request on a connection (IncompleteReadError when the client closed it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return RawRequest(n, head, await reader.readexactly(length))


@contextlib.asynccontextmanager
async def raw_backend(answer: Answer, *, base_path: str = "") -> AsyncIterator[RawBackend]:
    """`answer` each request on a free loopback port until the block ends (the connections
    still open are then cancelled)."""
    backend = RawBackend("")
    handlers: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        backend.connections += 1
        try:
            n = 0
            while True:
                n += 1
                request = await read_request(reader, n)
                backend.requests.append(request)
                backend.times.append(time.monotonic())
                if await answer(request, writer) is False:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            backend.closed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    backend.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{base_path}"
    try:
        yield backend
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
