"""The gateway's HTTP/1.1 server: an asyncio Protocol around httptools (llhttp, Node's C parser).

aiohttp's server did, per request, about as much work as the whole rest of the gateway (a
request object with multidicts, a router, middlewares, a response object with its own header
multidict, a payload writer): a profile at 32 concurrent clients put a quarter of the gateway's
CPU there, and 1,000 streams relayed through its `StreamResponse` ran at half nginx's speed. A
proxy needs much less: the request's head and body as bytes, and a way to write an answer
whole or chunk by chunk. That is this module, with the limits a server facing clients must keep
(as nginx keeps them):

- the head within `header_timeout` of connecting or of the request's first byte, and within
  32 KiB and 100 headers (else 408 or 431, and the connection closes);
- the body within `max_body_bytes` (413) and without a pause longer than `body_timeout` (408),
  enforced where the handler reads it (`Request.read`), since only it knows it wants the body;
- an idle keep-alive connection closed after `idle_timeout`;
- written answer bytes taken by the client at least every `send_timeout` (nginx's
  `send_timeout`): a client that reads nothing cannot hold its connection and backend slot;
- HTTP/1.1 as llhttp parses it: a request with both Content-Length and chunked framing, or any
  other malformed head, is refused with 400 and the connection closed (no request smuggling).

A request's handler runs as its own task from the moment its head arrived; the connection keeps
reading meanwhile, so a client that goes away is seen at once (its EOF or reset cancels the
task, as Go's net/http cancels a request's context): a queued request leaves the queue, and a
backend mid-answer sees its connection closed. Pipelined requests wait their turn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Literal, cast
from urllib.parse import unquote

import httptools
import orjson

from parallama.alarm import Alarm
from parallama.errors import ApiError
from parallama.gateway.http.guard import Connections
from parallama.gateway.http.http1 import JOIN_BELOW, Headers, date_header, error_answer, status_line
from parallama.gateway.http.listener import Listener, listening_sockets
from parallama.runtime import system_backlog

log = logging.getLogger("parallama.gateway")

Handler = Callable[["Request", "Reply"], Awaitable[None]]

MAX_HEAD_BYTES = 32 * 1024  # a request line and headers; nginx's large_client_header_buffers
MAX_HEADERS = 100
# Pipelined requests read ahead of the one being answered; a client that sends more at once
# is cut off (reading is not paused for them: a paused connection would not see its client go).
_MAX_PIPELINED = 64
# Unread body bytes past which a request's body stops being read until its handler takes it.
_BODY_HIGH_WATER = 1024 * 1024
_LINGER_SECONDS = 2.0  # after an early answer, time for the client to see it before we close


class ClientGone(ConnectionError):
    """The client closed its connection: nothing more can be written to it."""


@functools.lru_cache(maxsize=64)  # the names the gateway's code asks for
def _key(name: str) -> bytes:
    return name.lower().encode("latin-1")


class HeaderMap(Mapping[str, str]):
    """A request's headers by case-insensitive name (the first of repeated ones), decoded as
    Latin-1 as HTTP defines them."""

    __slots__ = ("_by_name",)

    def __init__(self, by_name: dict[bytes, bytes]) -> None:
        self._by_name = by_name  # lower-case names

    def __getitem__(self, name: str) -> str:
        return self._by_name[_key(name)].decode("latin-1")

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        value = self._by_name.get(_key(name))
        return default if value is None else value.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


class Request:
    """One request: its head, and its body as the connection receives it."""

    __slots__ = (
        "_body",
        "_complete",
        "_connection",
        "_error",
        "_path",
        "_waiter",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "raw_headers",
        "remote",
        "streamed",
        "target",
    )

    def __init__(
        self,
        connection: ServerConnection,
        method: str,
        target: bytes,
        raw_headers: Headers,
        by_name: dict[bytes, bytes],
        *,
        remote: str,
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self._connection = connection
        self.method = method
        self.target = target  # the path and query as sent
        self._path: str | None = None
        self.raw_headers = raw_headers
        self.remote = remote
        self.keep_alive = keep_alive
        self.http11 = http11
        self.headers = HeaderMap(by_name)
        # The body as it came: one piece (the usual case, taken as it is), or a bytearray that
        # pieces are added to (a chunked body of 2-byte chunks must not cost an object each).
        self._body: bytes | bytearray = b""
        self.streamed = False  # taken piece by piece (`pieces`), never held whole
        self._complete = False
        self._error: ApiError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def path(self) -> str:
        """The path without its query, percent-decoded (of an absolute-form target too, as a
        proxy may send: http://host/path); worked out once, as the gateway and the route both
        ask for it."""
        if self._path is None:
            target = self.target
            if not target.startswith(b"/") and b"://" in target:
                target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
            path = target.partition(b"?")[0].decode("latin-1")
            self._path = unquote(path) if "%" in path else path
        return self._path

    @property
    def body_complete(self) -> bool:
        return self._complete

    @property
    def body(self) -> bytes | None:
        """The whole body if it has arrived within its limit (the usual case: it came with the
        head), else None: then `read` it."""
        if not self._complete or self._error is not None:
            return None
        return bytes(self._body) if isinstance(self._body, bytearray) else self._body

    async def read(self) -> bytes:
        """The whole body: 413 past `max_body_bytes`, 408 if the client pauses longer than
        `body_timeout` while sending it (nginx's client_body_timeout)."""
        while not self._complete and self._error is None:
            await self._more()
        if self._error is not None:
            raise self._error
        return bytes(self._body) if isinstance(self._body, bytearray) else self._body

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it comes, for a target of `streamed_prefixes` (model blobs, gigabytes):
        what has arrived, then the rest piece by piece, with no `max_body_bytes`; reading
        pauses while a megabyte waits unread. 408 as `read`'s."""
        while True:
            if self._body:
                piece, self._body = bytes(self._body), b""
                self._connection.body_wanted(self)
                yield piece
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            await self._more()

    async def _more(self) -> None:
        """Until more of the body came, it ended or failed; a pause past `body_timeout` is the
        failure (408)."""
        pause = self._connection.connections.limits.body_timeout
        self._waiter = asyncio.get_running_loop().create_future()
        self._connection.body_wanted(self)
        try:
            async with asyncio.timeout(pause):
                await self._waiter
        except TimeoutError:
            self._error = ApiError(408, f"the request body stopped arriving for {pause:g} s")
        finally:
            self._waiter = None

    # -- fed by the connection ----------------------------------------------------------------

    @property
    def body_size(self) -> int:
        return len(self._body)

    def _feed(self, data: bytes) -> None:
        if self._error is not None:
            return  # refused already: the rest is dropped
        limit = self._connection.connections.limits.max_body_bytes
        if len(self._body) + len(data) > limit and not self.streamed:
            self._fail(ApiError(413, f"request body is larger than {limit} bytes"))
            self._body = b""
            return
        if not self._body:
            self._body = data
        elif isinstance(self._body, bytearray):
            self._body += data
        else:
            self._body = bytearray(self._body) + data
        self._wake()

    def _fail(self, error: ApiError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Reply:
    """How a handler answers its request: `send` a whole answer, or `start` one and `write` its
    body chunk by chunk (chunked encoding), then `end` it."""

    __slots__ = (
        "_chunked",
        "_connection",
        "_head_only",
        "_http11",
        "_request",
        "cross_origin",
        "ended",
        "extra_headers",
        "keep_alive",
        "started",
        "status",
    )

    def __init__(self, connection: ServerConnection, request: Request) -> None:
        self._connection = connection
        self._request = request
        self._head_only = request.method == "HEAD"
        self._http11 = request.http11
        self.keep_alive = request.keep_alive  # the connection stays open after this answer
        self._chunked = False
        self.started = False  # the status line has been written
        self.ended = False
        self.status = 0
        self.extra_headers: Headers = []  # on whatever answer goes out (rate-limit headers)
        self.cross_origin: Headers = []  # and `Access-Control-*` for a page on another origin

    def send(
        self,
        status: int,
        body: bytes,
        content_type: bytes | None = b"application/json",
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """The whole answer, with its Content-Length (`content_type` None: `headers` say it)."""
        head = self._head(status, headers, content_type)
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        self._connection.write_answer(head, b"" if self._head_only else body)
        self.ended = True

    def start(
        self,
        status: int,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes | None = None,
    ) -> None:
        """The status line and headers of an answer whose body follows in `write`s."""
        if not self._http11 and not self._head_only:
            self.keep_alive = False  # HTTP/1.0 has no chunks: the body ends with the connection
        head = self._head(status, headers, content_type)
        if self._head_only or not self._http11:
            head += b"\r\n"
        else:
            self._chunked = True
            head += b"Transfer-Encoding: chunked\r\n\r\n"
        self._connection.write(head)

    async def write(self, data: bytes) -> None:
        """A piece of the body; waits while the client is behind (flow control)."""
        self.write_now(data)
        if self._connection.paused:
            await self._connection.drain()

    def write_now(self, data: bytes) -> None:
        """A piece of the body, without waiting: whoever calls this watches `behind`."""
        if self._head_only or not data:
            return
        if self._connection.gone:
            raise ClientGone("the client closed the connection")
        self._connection.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    @property
    def behind(self) -> bool:
        """The client has not taken what was written so far: wait for `drain` before more."""
        return self._connection.paused

    async def drain(self) -> None:
        await self._connection.drain()

    def end(self) -> None:
        """The end of a body begun with `start`."""
        if self._chunked:
            self._connection.write_answer(b"0\r\n\r\n", b"")
        else:
            self._connection.write_answer(b"", b"")
        self.ended = True

    def _head(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], content_type: bytes | None
    ) -> bytes:
        if self.started:
            raise RuntimeError("the answer has begun already")
        if self._connection.gone:
            raise ClientGone("the client closed the connection")
        self.started = True
        self.status = status
        if not self._request.body_complete or self._connection.connections.draining:
            self.keep_alive = False  # answered before its body came, or stopping: it closes
        parts = [status_line(status), date_header()]
        if content_type is not None:
            parts.append(b"Content-Type: %s\r\n" % content_type)
        parts.extend(b"%s: %s\r\n" % pair for pair in headers)
        if self.extra_headers:
            parts.extend(b"%s: %s\r\n" % pair for pair in self.extra_headers)
        if self.cross_origin:
            parts.extend(b"%s: %s\r\n" % pair for pair in self.cross_origin)
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not self._http11:
            parts.append(b"Connection: keep-alive\r\n")
        return b"".join(parts)


Waiting = Literal["head", "idle", "linger"]


class ServerConnection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, each handed to `handler` in turn."""

    def __init__(self, handler: Handler, connections: Connections) -> None:
        self._handler = handler
        self.connections = connections
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._remote = ""
        self.gone = False
        self.paused = False  # the client is behind: writing waits (`drain`)
        self._drained: asyncio.Future[None] | None = None
        # The request being parsed, its head so far, and the ones waiting for their turn.
        self._parsing: Request | None = None
        self._in_head = False  # a request's head has begun and not ended
        self._url = b""
        self._headers: Headers = []
        self._by_name: dict[bytes, bytes] = {}
        self._head_bytes = 0
        self._head_arriving = 0
        self._past_chunks = False
        self._trailer_arriving = 0
        self._pending: deque[Request] = deque()
        self._reading_paused = False
        self._upgraded = False  # an upgrade request came: nothing after it is HTTP/1.1
        self._dropping = False  # a body was refused as it came: the rest is not read
        self._current: Request | None = None  # being answered
        self._task: asyncio.Task[None] | None = None
        # What the connection waits for from the client, and until when: one alarm serves
        # every deadline (pushed back lazily, so a busy keep-alive connection arms no timer per
        # request); the send deadline has its own, as it runs alongside the others.
        self._waiting: Waiting | None = None
        self._alarm = Alarm(self._rang, self._loop.time)
        self._unsent = 0  # write buffer size when the send deadline was set
        self._send_alarm = Alarm(self._send_late, self._loop.time)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self.connections.open[transport] = self
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else ""
        # A connection that never sends a request is closed as late as a late head.
        self._wait_for("head", self.connections.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._waiting == "linger" or self._upgraded or self._dropping:
            return  # closing, past an upgrade request or a refused body: dropped
        if self._in_head:
            # The parser holds a header value whole before it shows it (growing it by copies):
            # a head that keeps coming is bounded here, before it reaches the parser.
            self._head_arriving += len(data)
            if self._head_arriving > MAX_HEAD_BYTES:
                self._refuse(431, f"the request's head is larger than {MAX_HEAD_BYTES} bytes")
                return
        try:
            self._parser.feed_data(data)
            if self._past_chunks:
                # Reads after a chunk's size line that brought no body: the last chunk's
                # trailer, which the parser holds as it holds a head. Bounded alike.
                self._trailer_arriving += len(data)
                if self._trailer_arriving > MAX_HEAD_BYTES:
                    message = f"the request's trailer is larger than {MAX_HEAD_BYTES} bytes"
                    self._refuse_body(431, message)
                    return
        except httptools.HttpParserUpgrade:
            self._upgrade_refused()
            return
        except httptools.HttpParserError as exc:
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"the request's head is larger than {MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and self._current is None and self._waiting != "head":
            # Part of a head, between requests: the rest must follow within header_timeout.
            self._wait_for("head", self.connections.limits.header_timeout)

    def eof_received(self) -> bool:
        return False  # the client closed its side: as Go's net/http, take it as gone

    def close_when_answered(self) -> None:
        """The gateway is stopping: close now if no request is being answered or has begun
        to arrive, else once the answer is written (it says `Connection: close`)."""
        if self._current is None and not self._pending and not self._in_head:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        transport = self._transport
        if transport is not None:
            self.connections.open.pop(transport, None)
        self.connections.closed()
        self._waiting = None
        self._alarm.cancel()
        self._send_alarm.cancel()
        for request in (self._current, self._parsing, *self._pending):
            if request is not None:
                request._fail(ApiError(499, "request canceled"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the handler's awaits raise CancelledError
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        self._watch_sending()

    def resume_writing(self) -> None:
        self.paused = False
        self._send_alarm.cancel()  # it read enough to make room: progress,
        self._watch_sending()  # and what is still unsent has another send_timeout to go
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if len(self._pending) >= _MAX_PIPELINED:  # raising here makes feed_data raise
            raise httptools.HttpParserError(f"more than {_MAX_PIPELINED} pipelined requests")
        self._in_head = True
        self._url = b""
        self._headers = []
        self._by_name = {}
        self._head_bytes = 0  # in the fields seen so far
        self._head_arriving = 0  # received after the read that began the head
        self._past_chunks = False  # a chunk's size line came, and no body since
        self._trailer_arriving = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never a header of the request
        self._headers.append((name, value))
        self._by_name.setdefault(name.lower(), value)
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES or len(self._headers) > MAX_HEADERS:
            self._head_bytes = MAX_HEAD_BYTES + 1
            raise httptools.HttpParserError("head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._waiting == "head":
            self._waiting = None  # the head came in time
        parser = self._parser
        by_name = self._by_name
        request = Request(
            self,
            parser.get_method().decode("latin-1"),
            self._url,
            self._headers,
            by_name,
            remote=self._remote,
            keep_alive=parser.should_keep_alive(),
            http11=parser.get_http_version() == "1.1",
        )
        self._parsing = request
        limits = self.connections.limits
        request.streamed = self._url.startswith(limits.streamed_prefixes)
        length = by_name.get(b"content-length")
        limit = limits.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit and not request.streamed:
            request._fail(ApiError(413, f"request body is larger than {limit} bytes"))
        if self._current is None:
            self._begin(request)
        else:
            self._pending.append(request)

    def on_chunk_header(self) -> None:
        self._past_chunks = True  # the last chunk has no body: its trailer comes next

    def on_body(self, body: bytes) -> None:
        self._past_chunks = False
        self._trailer_arriving = 0
        request = self._parsing
        if request is None:
            return
        request._feed(body)
        if request is self._current:
            if request.streamed and request.body_size > _BODY_HIGH_WATER:
                self._pause_reading()  # taken piece by piece: no more until it is taken
        elif sum(r.body_size for r in self._pending) > _BODY_HIGH_WATER:
            # Pipelined ahead of their turn, all of them together: no more until one is taken.
            self._pause_reading()

    def on_message_complete(self) -> None:
        self._past_chunks = False
        request = self._parsing
        self._parsing = None
        if request is not None:
            request._end()

    # -- answering ----------------------------------------------------------------------------

    def _begin(self, request: Request) -> None:
        self._current = request
        self._waiting = None
        if not request.body_complete and request.http11 and request._error is None:
            expects = request.headers.get("Expect") or ""  # asked only while a body is due
            if expects.lower() == "100-continue":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it, to send
        self._task = self._loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        reply = Reply(self, request)
        try:
            await self._handler(request, reply)
        except (ClientGone, asyncio.CancelledError):
            self._close()
            return
        except Exception:
            log.exception("unhandled error while answering a request")
            if reply.started:
                self._abort()  # an answer cut in the middle: only closing the connection says so
                return
            reply.send(500, orjson.dumps({"error": "internal server error"}))
        if not reply.ended:
            self._abort()
            return
        self._answered(request, reply.keep_alive)

    def _answered(self, request: Request, keep_alive: bool) -> None:
        """The answer is written (the client may not have read it yet): the next request, or
        an idle wait for one, or the end of the connection."""
        self._current = None
        self._task = None
        if self.gone:
            return
        if not request.body_complete:  # answered early, the body still coming: no next request
            self._linger()
            return
        if not keep_alive or self.connections.draining:
            self._close()
            return
        if self._reading_paused:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        limits = self.connections.limits
        if self._pending:
            self._begin(self._pending.popleft())
        elif self._upgraded:  # what came after it is another protocol's
            self._close()
        elif self._in_head:  # the next request's head has begun
            self._wait_for("head", limits.header_timeout)
        else:
            self._wait_for("idle", limits.idle_timeout)

    def body_wanted(self, request: Request) -> None:
        """The handler waits for the body: let it come, if reading had paused."""
        if self._reading_paused and request is self._current and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self.gone:
            self._transport.write(data)

    def write_answer(self, head: bytes, body: bytes) -> None:
        """The last bytes of an answer: from now the client must take them within the send
        deadline (a small answer left unread would otherwise hold its connection for ever)."""
        transport = self._transport
        if transport is None or self.gone:
            raise ClientGone("the client closed the connection")
        if len(body) > JOIN_BELOW:
            transport.writelines((head, body))
        else:
            transport.write(head + body)
        if transport.get_write_buffer_size():
            self._watch_sending()

    async def drain(self) -> None:
        """Until the client has taken enough of what was written (or is gone)."""
        while self.paused and not self.gone:
            self._drained = self._loop.create_future()
            await self._drained
        if self.gone:
            raise ClientGone("the client closed the connection")

    # -- deadlines ----------------------------------------------------------------------------

    def _wait_for(self, what: Waiting, seconds: float) -> None:
        """From now, `what` must happen within `seconds`: a request's head (else 408), the next
        request on a kept-alive connection (else it closes), or the client's close (lingering)."""
        self._waiting = what
        self._alarm.set(self._loop.time() + seconds)

    def _rang(self) -> None:
        waiting = self._waiting
        if waiting is None or self.gone:
            return
        self._waiting = None
        if waiting == "head":
            self.connections.timeouts["head"] += 1
            limit = self.connections.limits.header_timeout
            self._refuse(408, f"the request's head did not arrive within {limit:g} s")
        elif waiting == "idle":
            self._close()
        else:
            self._abort()

    def _watch_sending(self) -> None:
        """While written bytes wait for the client, it must take some of them every
        `send_timeout` seconds (nginx's send_timeout, between two successive writes)."""
        transport = self._transport
        if self._send_alarm.deadline is None and transport is not None and not self.gone:
            self._unsent = transport.get_write_buffer_size()
            if self._unsent:
                limit = self.connections.limits.send_timeout
                self._send_alarm.set(self._loop.time() + limit)

    def _send_late(self) -> None:
        transport = self._transport
        if transport is None or self.gone:
            return
        unsent = transport.get_write_buffer_size()
        if unsent < self._unsent:  # it took some: another period for the rest
            self._watch_sending()
        elif unsent:
            # Not a byte taken: its answer would wait in our buffers for ever, and a closing
            # transport would wait for it to flush. (The backend's slot frees with it.)
            self.connections.timeouts["send"] += 1
            self._abort()

    def _upgrade_refused(self) -> None:
        """A request asked to switch protocols (curl --http2 asks for h2c): it is answered in
        HTTP/1.1, as the RFC lets a server, and the connection closes after it (what follows
        the request is the other protocol's). A body it has is not parsed: it is refused."""
        self._upgraded = True
        request = self._current if not self._pending else self._pending[-1]
        if request is None:
            self._refuse(400, "protocol upgrades are not supported")
            return
        framing = request.headers.get("Content-Length") or request.headers.get("Transfer-Encoding")
        if framing not in (None, "0"):
            request._fail(ApiError(400, "a request that asks for a protocol upgrade has no body"))

    # -- the end ------------------------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """A fault before any handler could answer: say so and close."""
        if self._current is None:
            self.write(error_answer(status, message))
            self._linger()
        else:  # an answer is being written: only closing the connection can say it
            self._abort()

    def _refuse_body(self, status: int, message: str) -> None:
        """A fault in the body of the request being answered: its handler answers it (the
        answer goes out, then the connection closes, lingering); nothing more is parsed."""
        request = self._parsing
        if request is None or request is not self._current:
            self._refuse(status, message)
            return
        request._fail(ApiError(status, message))
        self._parsing = None
        self._dropping = True

    def _linger(self) -> None:
        """Close after an early answer without losing it: closing with the client's bytes
        unread would send a reset, which can destroy the answer in flight. So the writing side
        is closed first, and what the client still sends is read and dropped until it closes,
        or for a short while."""
        transport = self._transport
        if transport is None or self.gone or self._waiting == "linger":
            return
        self._pending.clear()
        self._parsing = None
        if transport.can_write_eof():
            transport.write_eof()
        if self._reading_paused:
            transport.resume_reading()
        self._wait_for("linger", _LINGER_SECONDS)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


# Refusals open at once: past it, a connection is closed as soon as it is accepted (a flood must
# not take the descriptors that the refusals were to save).
_MAX_REFUSING = 64


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
        transport.write(error_answer(503, message, b"Retry-After: 1\r\n"))
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        """Its request, read and dropped."""

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._connections.refusing -= 1


async def start_server(
    handler: Handler,
    connections: Connections,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    backlog: int = 0,
) -> Listener:
    """Listen on host:port; each connection is answered by `handler`, within `connections`'
    limits. The cap counts a connection when it is accepted: the kernel accepts a burst before
    the event loop sees any of it, and the cap must hold for the whole burst. `backlog` 0: the
    system's."""

    def protocol() -> asyncio.Protocol:
        if connections.accepted >= connections.limits.max_connections:
            connections.refused += 1
            return Refusal(connections)
        connections.accepted += 1
        return ServerConnection(handler, connections)

    sockets = listening_sockets(
        host, port, reuse_port=reuse_port, backlog=backlog or system_backlog()
    )
    return Listener(asyncio.get_running_loop(), sockets, protocol)


def send_json(reply: Reply, payload: object, status: int = 200) -> None:
    reply.send(status, orjson.dumps(payload))
