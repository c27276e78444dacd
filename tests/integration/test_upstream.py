"""The gateway's upstream client against hand-written HTTP servers on loopback: the cases a real
backend produces only now and then (a keep-alive connection closed as it is reused, silence,
answers framed each possible way, a reader that falls behind)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import struct
import threading

import pytest

from parallama.gateway.http.upstream import DROPPED, Upstream, UpstreamError, UpstreamTimeout
from tests.rawhelpers import Answer, RawBackend, RawRequest, raw_backend

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"


def backend(answer: Answer) -> contextlib.AbstractAsyncContextManager[RawBackend]:
    """A hand-written backend under a base path, which the upstream client must keep."""
    return raw_backend(answer, base_path="/base")


def upstream(url: str, read_timeout: float = 5.0) -> Upstream:
    return Upstream(url, connect_timeout=2.0, read_timeout=read_timeout)


async def fetch(up: Upstream, body: bytes = b"{}") -> tuple[int, bytes]:
    reply = await up.send(b"POST", b"/api/chat", [(b"Content-Type", b"application/json")], body)
    try:
        return reply.status, await reply.read()
    finally:
        reply.release()


async def test_requests_reuse_one_connection_and_carry_host_length_and_base_path() -> None:
    async def ok(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK + b'{"done":true}')
        return True

    async with backend(ok) as server:
        up = upstream(server.url)
        answers = [await fetch(up, b'{"n":%d}' % i) for i in range(5)]
        await up.close()
    assert answers == [(200, b'{"done":true}')] * 5
    assert server.connections == 1
    first = server.requests[0].head + server.requests[0].body
    assert first.startswith(b"POST /base/api/chat HTTP/1.1\r\n")
    host = server.url.removeprefix("http://").removesuffix("/base").encode()
    assert b"\r\nHost: " + host + b"\r\n" in first
    assert first.endswith(b'Content-Length: 7\r\n\r\n{"n":0}')


async def test_a_kept_connection_closed_as_a_request_went_out_is_sent_once_more() -> None:
    """The keep-alive race, as llama-server plays it: it closes an idle connection after 5 s
    without reading what arrives, so a request written just then gets no byte of answer. It is
    no failure of the backend: the request goes once more, on a new connection."""

    async def close_kept_ones(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.n == 1:  # answer, promise keep-alive, then close as the next request comes
            writer.write(OK + b'{"done":true}')
            return True
        return False

    async with backend(close_kept_ones) as server:
        up = upstream(server.url)
        answers = [await fetch(up), await fetch(up)]
        await up.close()
    assert answers == [(200, b'{"done":true}')] * 2
    assert server.connections == 2
    assert [request.n for request in server.requests] == [1, 2, 1]


async def test_a_request_dropped_on_a_fresh_connection_is_never_sent_to_it_again() -> None:
    """The backend may have worked on it (an engine that crashed on this very prompt): sending
    it again here would repeat the work, or the crash. Only the gateway may try elsewhere."""

    async def answer_only_the_first(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if server.connections == 1 and request.n == 1:
            writer.write(OK + b'{"done":true}')
            return True
        return False

    async with backend(answer_only_the_first) as server:
        up = upstream(server.url)
        assert await fetch(up) == (200, b'{"done":true}')
        with pytest.raises(UpstreamError, match=re.escape(DROPPED)) as dropped:
            await fetch(up)  # dropped on the kept connection, then on a fresh one
        await up.close()
    assert dropped.value.reached
    assert len(server.requests) == 3  # once on each connection, never twice on a fresh one


async def test_a_short_keep_alive_announced_is_kept_to() -> None:
    short = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=100\r\nContent-Length: 13\r\n\r\n"

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(short + b'{"done":true}')
        return True

    async with backend(answer) as server:
        up = upstream(server.url)
        await fetch(up)
        await fetch(up)  # at once: the kept connection serves
        await asyncio.sleep(0.9)  # idle longer than 0.8 of the second the backend keeps it
        await fetch(up)
        await up.close()
    assert server.connections == 2
    assert [request.n for request in server.requests] == [1, 2, 1]


async def test_a_backend_that_resets_after_reading_the_request_is_reported_as_crashed() -> None:
    async def crash(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # linger 0: a reset, as a killed process with input unread
        return False

    async with backend(crash) as server:
        up = upstream(server.url)
        with pytest.raises(UpstreamError, match="it may have crashed") as crashed:
            await fetch(up)
        await up.close()
    assert crashed.value.reached
    assert "could not be reached" not in str(crashed.value)


def test_an_idle_connection_the_backend_closed_is_replaced_before_a_request_is_written() -> None:
    """The backend closed its side of the idle connection, and the event loop has not yet seen
    it (here it is kept busy on purpose): the request must go out on a fresh connection, never
    be written into the dead one (where the backend, reading on, would see it), and arrive
    exactly once."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []
    into_the_closed_one: list[bytes] = []
    first_closed = threading.Event()

    def serve() -> None:
        first, _ = listener.accept()
        received.append(read_request(first))
        first.sendall(OK + b'{"done":true}')
        first.shutdown(socket.SHUT_WR)  # keep-alive promised, then closed while idle
        first_closed.set()
        second, _ = listener.accept()
        with first, second:
            received.append(read_request(second))
            second.sendall(OK + b'{"done":true}')
            first.settimeout(0.5)
            with contextlib.suppress(TimeoutError, ConnectionError):
                while data := first.recv(65536):  # what a client wrote after the close
                    into_the_closed_one.append(data)

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    async def client() -> list[tuple[int, bytes]]:
        up = upstream(f"http://127.0.0.1:{port}")
        first = await fetch(up)
        assert first_closed.wait(5)  # blocks this loop: the close is not processed yet
        second = await fetch(up)
        await up.close()
        return [first, second]

    try:
        assert asyncio.run(client()) == [(200, b'{"done":true}')] * 2
        server.join(5)
    finally:
        listener.close()
    assert len(received) == 2
    assert into_the_closed_one == []


def read_request(conn: socket.socket) -> bytes:
    """One whole request (head and Content-Length body) from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


async def test_an_answer_cut_after_its_first_byte_is_not_retried() -> None:
    async def cut(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        return False

    async with backend(cut) as server:
        up = upstream(server.url)
        with pytest.raises(UpstreamError, match="closed the connection"):
            await fetch(up)
        await up.close()
    assert len(server.requests) == 1


async def test_silence_is_a_timeout_but_a_slow_steady_stream_is_not() -> None:
    async def trickle(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if b"silent" in request.head:
            await asyncio.Event().wait()  # never answers
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, never 0.3 s quiet
            writer.write(b"1\r\nx\r\n")
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        return True

    async with backend(trickle) as server:
        up = upstream(server.url, read_timeout=0.3)
        assert await fetch(up) == (200, b"xxxxxx")
        with pytest.raises(UpstreamTimeout, match=r"was silent for 0\.3 s"):
            await up.send(b"POST", b"/silent", [], b"")
        await up.close()


async def test_chunked_unframed_and_bodyless_answers() -> None:
    async def framed(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if b"/chunked" in request.head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            return True
        if b"/empty" in request.head:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        return False

    async with backend(framed) as server:
        up = upstream(server.url)
        replies = []
        for target in (b"/chunked", b"/empty", b"/unframed"):
            reply = await up.send(b"GET", target, [], b"")
            replies.append((reply.status, await reply.read()))
            reply.release()
        await up.close()
    assert replies == [(200, b"abcde"), (204, b""), (200, b"until the end")]
    assert server.connections == 1


async def test_a_reader_that_falls_behind_slows_the_backend_instead_of_filling_memory() -> None:
    big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's socket buffers hold
    written = asyncio.Event()

    async def flood(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
        writer.write(big)
        await writer.drain()
        written.set()
        return True

    async with backend(flood) as server:
        up = upstream(server.url)
        reply = await up.send(b"GET", b"/big", [], b"")
        # The reader takes nothing for a while: the backend must not be able to finish.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(written.wait(), 0.5)
        digest = hashlib.sha256()
        while (chunk := await reply.next_chunk()) is not None:
            digest.update(chunk)
        reply.release()
        await written.wait()
        await up.close()
    assert digest.digest() == hashlib.sha256(big).digest()


async def test_releasing_mid_answer_closes_the_connection_so_the_backend_stops() -> None:
    async def endless(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return True

    async with backend(endless) as server:
        up = upstream(server.url)
        reply = await up.send(b"POST", b"/api/generate", [], b"{}")
        assert await reply.next_chunk() == b"hello"
        reply.release()
        await asyncio.wait_for(server.closed.wait(), 5)
        assert up.open_connections == 0
        await up.close()


async def test_unreachable_and_invalid_backends_fail_with_a_reason() -> None:
    async def garbage(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SMTP ready\r\n\r\n")
        return True

    async with backend(garbage) as server:
        up = upstream(server.url)
        with pytest.raises(UpstreamError, match="sent invalid HTTP"):
            await fetch(up)
        await up.close()
    refused = upstream(server.url)  # its server is gone now
    with pytest.raises(UpstreamError, match="could not be reached") as unreachable:
        await fetch(refused)
    assert not unreachable.value.reached  # so any backend may take the request


async def test_a_connection_whose_reading_was_paused_serves_the_next_request() -> None:
    """A slow reader paused reading; its client left once the whole answer was in, so the
    connection went back to the pool complete but still paused: the next request on it was
    written, answered, and never read (found by review)."""
    big = b"x" * 270_000  # just past the pause threshold (256 KiB), in one write

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big))
        else:
            writer.write(OK + b'{"done":true}')
        return True

    async with backend(answer) as server:
        up = upstream(server.url, read_timeout=2.0)
        reply = await up.send(b"POST", b"/api/generate", [], b"{}")
        async with asyncio.timeout(5):  # its client reads nothing; the whole answer arrives
            while not reply._answer.complete:  # noqa: ASYNC110 (no event says so)
                await asyncio.sleep(0.01)
        reply.release()  # and the client is gone
        async with asyncio.timeout(5):
            assert await fetch(up) == (200, b'{"done":true}')
        await up.close()
    assert server.connections == 1  # the same connection, reused


async def test_pumping_pauses_the_backend_while_the_consumer_is_behind() -> None:
    """`pump` hands the body over from the socket's callback: a consumer that says it is behind
    must still slow the backend (it cannot finish writing) until it has drained."""
    big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's socket buffers hold
    written, drained = asyncio.Event(), asyncio.Event()

    async def flood(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big))
        await writer.drain()
        written.set()
        return True

    digest = hashlib.sha256()
    behind = True

    def sink(data: bytes) -> bool:
        digest.update(data)
        return not behind

    async def wait_for_room() -> None:
        nonlocal behind
        await drained.wait()
        behind = False

    async with backend(flood) as server:
        up = upstream(server.url)
        reply = await up.send(b"GET", b"/big", [], b"")
        pumping = asyncio.ensure_future(reply.pump(sink, wait_for_room))
        with pytest.raises(TimeoutError):  # the consumer is behind: the backend cannot finish
            await asyncio.wait_for(asyncio.shield(written.wait()), 0.5)
        drained.set()
        await asyncio.wait_for(pumping, 10)
        reply.release()
        await up.close()
    assert written.is_set()
    assert digest.digest() == hashlib.sha256(big).digest()


async def test_no_more_connections_are_kept_idle_than_the_backend_serves_at_once() -> None:
    """llama-server serves HTTP on a few threads (sized from its CPUs): connections kept idle
    beyond its slots held them, and requests waited behind them."""

    async def slow(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)  # the six overlap
        writer.write(OK + b'{"done":true}')
        return True

    async with backend(slow) as server:
        up = Upstream(server.url, connect_timeout=2.0, read_timeout=5.0, max_idle=2)
        answers = await asyncio.gather(*(fetch(up) for _ in range(6)))
        kept = up.open_connections
        await up.close()
    assert answers == [(200, b'{"done":true}')] * 6
    assert server.connections == 6
    assert kept == 2
