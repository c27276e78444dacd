"""Pooled HTTP/1.1 keep-alive connections to one backend: the gateway's upstream client.

A proxy needs little of an HTTP client: write the request's bytes, parse the status line and
headers, hand the body on as it arrives. aiohttp's client does much more per request (cookies,
redirects, URL handling, tracing, its own stream reader) and took about 60 % of the gateway's CPU
per request; this one is an asyncio Protocol around httptools (llhttp, Node's C parser) and
lets the gateway proxy about three times as many requests per second on one core.

What it promises: one request at a time per connection; connections kept alive and reused,
newest first; an idle connection is checked before it is reused (one the backend closed, or idle
longer than the backend said it keeps one, or than servers commonly do, is replaced by a fresh
one); a request is sent again from here only in the keep-alive race: the backend closed a
reused connection as the request went out (within `_RACE_SECONDS`), without a byte of answer,
and the request goes once more on a fresh connection (llama-server closes a connection after
every streamed answer, and an idle one silently after 5 s, without reading what arrives; an
engine that crashed on the prompt cannot take the fresh connection).
Any other failure after the request was written is final here, since the backend may have
worked on it (failover to another backend is the gateway's decision, told by `reached`);
a read timeout that measures silence, as nginx's `proxy_read_timeout` does; reading paused while
the consumer is behind, so a slow client slows the backend instead of filling memory; and a
connection released mid-answer is closed, so the backend sees the client leave and frees its
slot.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import typing
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

from parallama.alarm import Alarm
from parallama.gateway.http.http1 import (
    JOIN_BELOW,
    AnswerReader,
    Headers,
    ProtocolError,
    request_head,
)

# Reading from the backend pauses above this many unread body bytes and resumes below the low mark.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# How long an idle connection to a backend may sit unused before it is closed: less
# than the keep-alive of llama-server and uvicorn (5 s: vLLM) and Node, so that the backend
# seldom closes a connection just as it is reused; less still if its `Keep-Alive` says so.
_IDLE_SECONDS = 4.0
_IDLE_SHARE = 0.8  # of the `Keep-Alive: timeout=` a backend announces
# A kept connection closed this soon after a request was written on it, without a byte of
# answer, was closed by the backend before it read the request: a round trip and a busy event
# loop's delay, not the time to work on a prompt.
_RACE_SECONDS = 0.5
WHOLE_LIMIT = 16 * 2**20  # bytes of a probe's or listing's answer


class UpstreamError(Exception):
    """The backend could not be reached, closed the connection, or broke HTTP: a 502.

    Messages complete the sentence "backend <url> ...". `reached` is False only when the
    request provably never reached the backend (no connection, or none to write it on): then
    any backend may take it; otherwise the backend may have worked on it.
    """

    def __init__(self, message: str, *, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached


class UpstreamTimeout(UpstreamError):
    """The backend could not be reached or stayed silent within the time allowed: a 504."""


# How a connection that ended before the answer did reads in the client's error message: an
# engine killed mid-request is seen so (a reset, or a plain close when it had read everything).
DROPPED = "closed the connection while processing this request (it may have crashed)"


class _ReadFlow:
    """Reading from the backend pauses above `_HIGH_WATER` unread body bytes and resumes below
    `_LOW_WATER`, or (while pumping) while the consumer is behind: a slow client slows the
    backend instead of filling memory."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.paused = False

    def received(self, unread: int) -> None:
        if unread > _HIGH_WATER:
            self.hold()

    def taken(self, unread: int) -> bool:
        """True if reading resumed."""
        if self.paused and unread < _LOW_WATER:
            self.release()
            return True
        return False

    def hold(self) -> None:
        if not self.paused:
            self.paused = True
            self._transport.pause_reading()

    def release(self) -> None:
        if self.paused:
            self.paused = False
            self._transport.resume_reading()


class Connection(asyncio.Protocol):
    """One keep-alive connection, and the answer it is receiving.

    `Upstream.send` returns it once the answer's head has arrived; read `status` and `headers`,
    then the body with `read` or `next_chunk`, and always `release` it.
    """

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._loop = upstream.loop
        self._answer = AnswerReader()
        self._transport: asyncio.Transport | None = None
        self._flow: _ReadFlow | None = None
        self._readable: select.poll | None = None  # whether the socket has anything to read
        self.closed = False
        self.idle_since = 0.0
        self.idle_limit = _IDLE_SECONDS
        self.answering = False  # a byte of the answer to the request in flight has arrived
        self.sent_at = 0.0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # While `pump` runs: where the body goes, whether its consumer is behind, and what it
        # raised (it runs in the socket's callback, not in the task that awaits the pump).
        self._sink: Callable[[bytes], bool] | None = None
        self._held = False
        self._sink_error: BaseException | None = None
        # The silence deadline: last heard + read_timeout, moved on by every chunk. Its alarm is
        # set once per request and looks again when it rings, not re-armed for every chunk.
        self._heard_at = 0.0
        self._silence = Alarm(self._on_silence, self._loop.time)

    @property
    def status(self) -> int:
        return self._answer.status

    @property
    def headers(self) -> Headers:
        return self._answer.headers

    # -- the request ----------------------------------------------------------------------------

    async def start(self, request: bytes, body: bytes) -> None:
        """Send a request and wait for the head of its answer."""
        assert self._transport is not None
        answer = self._answer
        answer.reset()  # what was left unread of the last answer goes, and with it any pause
        if self._flow is not None:
            self._flow.release()
        self._error = None
        self.answering = False
        self._heard_at = self.sent_at = now = self._loop.time()
        self._silence.set(now + self._upstream.read_timeout)
        if len(body) > JOIN_BELOW:
            self._transport.writelines((request, body))
        else:
            self._transport.write(request + body)
        while not answer.head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrived; None once the answer is complete."""
        answer = self._answer
        while (chunk := answer.take()) is None:
            if answer.complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._flow is not None and self._flow.taken(answer.buffered):
            self._heard_at = self._loop.time()  # the silence so far was ours, not the backend's
        return chunk

    async def pump(
        self, sink: Callable[[bytes], bool], drained: Callable[[], Awaitable[None]]
    ) -> None:
        """Hand the body to `sink` piece by piece as it arrives, from the socket's own callback:
        no task switch per piece, which is most of what relaying a stream costs. `sink` returns
        False while its consumer is behind; reading from the backend then pauses until
        `drained()` returns. Returns once the answer is complete; raises what `sink` raised, or
        the connection's error."""
        answer = self._answer
        self._sink, self._held, self._sink_error = sink, False, None
        try:
            self._feed_sink()
            while True:
                if self._sink_error is not None:
                    raise self._sink_error
                if self._held:
                    await drained()
                    self._held = False
                    if self._flow is not None:
                        self._flow.release()
                    self._heard_at = self._loop.time()  # the wait was ours, not the backend's
                    self._feed_sink()
                    continue
                if answer.complete and not answer.buffered:
                    return
                if self._error is not None:
                    raise self._error
                await self._wait()
        finally:
            self._sink = None

    def _feed_sink(self) -> None:
        sink, answer = self._sink, self._answer
        assert sink is not None
        while not self._held and (chunk := answer.take_all()) is not None:
            try:
                keep_going = sink(chunk)
            except Exception as exc:  # the consumer's: told to the task that pumps
                self._sink_error = exc
                return
            if not keep_going:
                self._held = True
                if self._flow is not None:
                    self._flow.hold()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with this answer: keep the connection for the next request if the answer ended
        cleanly, else close it (mid-answer, that tells the backend to stop working)."""
        answer = self._answer
        if answer.complete and answer.keep_alive and not self.closed:
            told = answer.keep_alive_timeout  # less than ours: kept to
            self.idle_limit = (
                _IDLE_SECONDS if told is None else min(_IDLE_SECONDS, _IDLE_SHARE * told)
            )
            self._upstream.keep(self)
        else:
            self.close()

    def usable(self, now: float) -> bool:
        """Whether an idle connection can carry a request: open, not idle too long, and with
        nothing to read. The backend sends nothing between answers, so a readable socket means
        it closed the connection (or broke HTTP) while it sat idle, though the event loop has
        not noticed yet: writing a request there would lose it."""
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            return False
        if now - self.idle_since > self.idle_limit:
            return False
        return self._readable is None or not self._readable.poll(0)

    def close(self) -> None:
        self._silence.cancel()
        if not self.closed:
            self.closed = True
            self._upstream.forget(self)
            if self._transport is not None:
                self._transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._flow = _ReadFlow(self._transport)
        socket = transport.get_extra_info("socket")
        if socket is not None:  # made once: `usable` then costs one system call
            self._readable = select.poll()
            self._readable.register(socket.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        self._heard_at = self._loop.time()
        self.answering = True
        answer = self._answer
        try:
            answer.feed(data)
        except ProtocolError as exc:
            self._fail(UpstreamError(str(exc)))
            return
        if self._sink is not None:  # pumping: the task is woken only when it has to act
            if not self._held:
                self._feed_sink()
            if not (answer.complete or self._held or self._sink_error is not None):
                return
        elif self._flow is not None and not answer.complete:  # a whole answer needs no brake
            self._flow.received(answer.buffered)
        self._wake()

    def eof_received(self) -> bool:
        return False  # half-closed is closed: let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._upstream.forget(self)
        self._silence.cancel()
        ended = self._answer.connection_ended() if exc is None else self._answer.complete
        if not ended and self._error is None:
            self._error = UpstreamError(DROPPED)
        self._wake()

    def pause_writing(self) -> None:
        """Requests are written whole and small; the kernel's buffer holds them."""

    def resume_writing(self) -> None:
        """See pause_writing."""

    # -- plumbing -------------------------------------------------------------------------------

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if not self._answer.complete and self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _on_silence(self) -> None:
        if self._answer.complete or self.closed:
            return  # no answer awaited: the next request sets it again
        timeout = self._upstream.read_timeout
        now = self._loop.time()
        if self._flow is not None and self._flow.paused:  # waiting on our consumer, not on it
            self._heard_at = now
        deadline = self._heard_at + timeout
        if now >= deadline:
            self._fail(UpstreamTimeout(f"was silent for {timeout:g} s"))
        else:
            self._silence.set(deadline)


class Upstream:
    """The connections to one backend, given by its base URL (http or https, optional path)."""

    def __init__(
        self, base_url: str, *, connect_timeout: float, read_timeout: float, max_idle: int = 256
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http:// or https:// URL")
        https = parts.scheme == "https"
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle  # connections kept open with nothing to do
        self._hostname = parts.hostname
        self._port = parts.port or (443 if https else 80)
        self._ssl = ssl.create_default_context() if https else None
        self._prefix = parts.path.rstrip("/").encode()
        self._host = parts.netloc.rpartition("@")[2].encode("idna")
        self._idle: deque[Connection] = deque()
        self._open: set[Connection] = set()
        self._retired = False
        self.loop = asyncio.get_running_loop()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def send(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> Connection:
        """Send a request on a pooled connection; return it once the answer's head arrived.

        `target` is the path (and query) after the backend's base URL; `headers` must not
        include Host, Content-Length or hop-by-hop headers: they are set here.
        """
        request = request_head(method, self._prefix + target, self._host, headers, len(body))
        kept = self._take_idle()
        if kept is not None:
            try:
                return await self._start(kept, request, body)
            except UpstreamError as exc:
                raced = self.loop.time() - kept.sent_at < _RACE_SECONDS
                if kept.answering or isinstance(exc, UpstreamTimeout) or not raced:
                    raise
                # The keep-alive race: closed as the request went out; once more, on a fresh one.
        return await self._start(await self._connect(), request, body)

    @staticmethod
    async def _start(conn: Connection, request: bytes, body: bytes) -> Connection:
        try:
            await conn.start(request, body)
        except BaseException:
            conn.close()  # on cancellation too: closing tells the backend to stop
            raise
        return conn

    def keep(self, conn: Connection) -> None:
        """Take back a connection whose answer ended cleanly; close the ones idle too long."""
        if self._retired:
            conn.close()
            return
        now = self.loop.time()
        conn.idle_since = now
        self._idle.append(conn)
        idle = self._idle
        while idle and (len(idle) > self.max_idle or idle[0].idle_since < now - idle[0].idle_limit):
            idle.popleft().close()

    async def get(self, target: bytes, timeout: float) -> tuple[int, bytes]:  # noqa: ASYNC109
        """A whole GET answer within `timeout`: status and body; status 0 if none came.

        For probes and listings, which treat "no answer in time" like any failure: taking the
        timeout here saves each caller its own `asyncio.timeout` and `TimeoutError` mapping."""
        return await self._whole(b"GET", target, b"", timeout)

    async def post(self, target: bytes, body: Any, timeout: float) -> tuple[int, bytes]:  # noqa: ASYNC109
        """A whole answer to a POST of `body` as JSON within `timeout`; status 0 if none came."""
        return await self._whole(b"POST", target, orjson.dumps(body), timeout)

    async def post_json(self, target: bytes, body: Any, timeout: float) -> Any:  # noqa: ASYNC109
        """The JSON of a 200 answer to a POST of `body` as JSON within `timeout`, else None."""
        return _json(await self.post(target, body, timeout))

    async def _whole(
        self,
        method: bytes,
        target: bytes,
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, bytes]:
        """A whole answer, up to `WHOLE_LIMIT` bytes (status 0 if longer: a listing that big is
        not one to trust)."""
        reply = None
        headers = [(b"content-type", b"application/json")] if body else []
        try:
            async with asyncio.timeout(timeout):
                reply = await self.send(method, target, headers, body)
                parts, size = [], 0
                while (chunk := await reply.next_chunk()) is not None:
                    size += len(chunk)
                    if size > WHOLE_LIMIT:
                        return 0, b""  # released unfinished: the connection is closed
                    parts.append(chunk)
                return reply.status, b"".join(parts)
        except (UpstreamError, TimeoutError):
            return 0, b""
        finally:
            if reply is not None:
                reply.release()

    async def get_json(self, target: bytes, timeout: float) -> Any:  # noqa: ASYNC109
        """The JSON of a 200 answer to a GET within `timeout`, else None."""
        return _json(await self.get(target, timeout))

    def retire(self) -> None:
        """The backend was removed: close idle connections now, the others when released."""
        self._retired = True
        while self._idle:
            self._idle.pop().close()

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    def forget(self, conn: Connection) -> None:
        """A connection closed: by us, or by the backend."""
        self._open.discard(conn)

    def _take_idle(self) -> Connection | None:
        """The most recently used connection that can still carry a request; the ones that
        cannot are closed on the way."""
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _connect(self) -> Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self), self._hostname, self._port, ssl=self._ssl
                )
        except TimeoutError:
            limit = self.connect_timeout
            raise UpstreamTimeout(
                f"did not accept a connection within {limit:g} s", reached=False
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"could not be reached: {exc.strerror or exc}", reached=False
            ) from None
        self._open.add(conn)
        return conn


def _json(answer: tuple[int, bytes]) -> Any:
    """The JSON of a 200 answer, else None."""
    status, body = answer
    if status != 200:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
