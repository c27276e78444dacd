"""The gateway's own HTTP/1.1 server, over raw sockets: what clients other than httpx send
(HEAD, HTTP/1.0, `Expect: 100-continue`, chunked bodies, pipelined requests) and what an
attacker sends (smuggling, huge heads, garbage)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from parallama.config import BackendSettings
from parallama.gateway.app import Gateway
from parallama.sim.server import SimServer
from tests.simhelpers import (
    CHAT_MODEL,
    gateway_status,
    gateway_with,
    make_config,
    sim_server,
    sim_servers,
)

GENERATE = orjson.dumps({"model": CHAT_MODEL, "prompt": "hi", "stream": False})
STREAM = orjson.dumps({"model": CHAT_MODEL, "prompt": "hi"})


@pytest.fixture(scope="module")
def gateway(sim: SimServer) -> Iterator[Gateway]:
    with gateway_with((BackendSettings(url=sim.url),)) as running:
        yield running


async def until_closed(port: int, *parts: bytes, wait_for: bytes | None = None) -> bytes:
    """Send `parts` on one connection and read until the server closes it. With `wait_for`,
    the parts after the first go only once the answer so far holds those bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        async with asyncio.timeout(10):
            writer.write(parts[0])
            if wait_for is not None:
                while wait_for not in received:
                    received += await reader.read(65536)
            for part in parts[1:]:
                writer.write(part)
            return received + await reader.read()
    finally:
        writer.close()


def post(path: str, body: bytes, *headers: bytes, version: bytes = b"1.1") -> bytes:
    head = b"POST %s HTTP/%s\r\nHost: localhost\r\nContent-Length: %d\r\n" % (
        path.encode(),
        version,
        len(body),
    )
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def answers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Whole answers with a Content-Length, in order: (head, body) each."""
    found = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        found.append((head, raw[:length]))
        raw = raw[length:]
    return found


def test_head_is_answered_with_gets_headers_and_no_body(gateway: Gateway) -> None:
    close = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    raw = asyncio.run(
        until_closed(gateway.port, b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n" + close)
    )
    head_answer, _, rest = raw.partition(b"\r\n\r\n")
    assert head_answer.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: 17" in head_answer
    ((_, text),) = answers(rest)  # no body between the two answers
    assert text == b"Ollama is running"  # and the connection still served the next request


def test_an_http10_client_gets_its_stream_unchunked_until_the_connection_closes(
    gateway: Gateway,
) -> None:
    raw = asyncio.run(until_closed(gateway.port, post("/api/generate", STREAM, version=b"1.0")))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding" not in head.lower()
    assert b"Connection: close" in head
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert len(lines) > 2
    assert lines[-1]["done"] is True


def test_expect_100_continue_gets_its_interim_answer_before_the_body(gateway: Gateway) -> None:
    whole = post("/api/generate", GENERATE, b"Expect: 100-continue", b"Connection: close")
    head, _, body = whole.partition(b"\r\n\r\n")
    raw = asyncio.run(until_closed(gateway.port, head + b"\r\n\r\n", body, wait_for=b"\r\n\r\n"))
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert orjson.loads(raw.partition(b"\r\n\r\n")[2].partition(b"\r\n\r\n")[2])["done"]


def test_a_chunked_request_body_is_read_whole(gateway: Gateway) -> None:
    half = len(GENERATE) // 2
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half,
        GENERATE[:half],
        len(GENERATE) - half,
        GENERATE[half:],
    )
    head = (
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    ((status, body),) = answers(asyncio.run(until_closed(gateway.port, head + chunks)))
    assert status.startswith(b"HTTP/1.1 200 OK")
    assert orjson.loads(body)["done"] is True


def test_a_request_framed_two_ways_is_refused_and_never_forwarded(gateway: Gateway) -> None:
    """Content-Length and chunked together is how requests are smuggled past a proxy."""
    before = gateway_status(gateway.url)["total"]
    smuggled = (
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /parallama/status HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    raw = asyncio.run(until_closed(gateway.port, smuggled))
    ((head, body),) = answers(raw)  # one answer, and the connection closed
    assert head.startswith(b"HTTP/1.1 400 ")
    assert "malformed HTTP request" in orjson.loads(body)["error"]
    assert gateway_status(gateway.url)["total"] == before


def test_a_head_larger_than_32_kib_is_431(gateway: Gateway) -> None:
    huge = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
    ((head, body),) = answers(asyncio.run(until_closed(gateway.port, huge)))
    assert head.startswith(b"HTTP/1.1 431 ")
    assert "larger than 32768 bytes" in orjson.loads(body)["error"]


def test_garbage_is_a_400(gateway: Gateway) -> None:
    ((head, body),) = answers(asyncio.run(until_closed(gateway.port, b"HELLO THERE\r\n\r\n")))
    assert head.startswith(b"HTTP/1.1 400 ")
    assert "error" in orjson.loads(body)


def test_pipelined_requests_are_answered_in_order(gateway: Gateway) -> None:
    requests = (
        post("/api/generate", GENERATE)
        + b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
        + b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    first, second, third = answers(asyncio.run(until_closed(gateway.port, requests)))
    assert orjson.loads(first[1])["done"] is True
    assert "version" in orjson.loads(second[1])
    assert third[1] == b"Ollama is running"


def test_unknown_routes_and_methods_are_answered_in_the_routes_dialect(gateway: Gateway) -> None:
    requests = (
        b"GET /v1/nothing HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /api/chat HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    (not_found, openai_error), (not_allowed, ollama_error) = answers(
        asyncio.run(until_closed(gateway.port, requests))
    )
    assert not_found.startswith(b"HTTP/1.1 404 ")
    assert orjson.loads(openai_error)["error"]["message"] == "no route GET /v1/nothing"
    assert not_allowed.startswith(b"HTTP/1.1 405 ")
    assert orjson.loads(ollama_error) == {"error": "method GET not allowed on /api/chat"}


# -- found by review: each of these failed before its fix ---------------------------------------


def test_a_client_that_pipelines_without_end_is_cut_off(gateway: Gateway) -> None:
    """Requests parsed ahead of their turn are bounded (they once piled up by the million)."""
    flood = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 500
    try:
        raw = asyncio.run(until_closed(gateway.port, flood))
    except ConnectionResetError:
        raw = b""  # cut off at once
    assert raw.count(b"HTTP/1.1 200 OK") < 500
    with httpx.Client(base_url=gateway.url, timeout=10) as http:  # the others are served
        assert http.get("/api/version").status_code == 200


def test_a_header_that_keeps_coming_is_a_431_before_the_head_deadline(gateway: Gateway) -> None:
    """The parser holds a header value whole before showing it: the bound must hold before."""

    async def endless_header() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Pad: ")
        answer = asyncio.ensure_future(reader.read(65536))
        try:
            async with asyncio.timeout(5):  # header_timeout is 10 s
                while not answer.done():
                    writer.write(b"a" * 4096)
                    await writer.drain()
                    await asyncio.wait([answer], timeout=0.01)  # the client's own pace
                return answer.result()
        finally:
            answer.cancel()
            writer.close()

    answer = asyncio.run(endless_header())
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_100_continue_never_lands_inside_the_answer_before_it(gateway: Gateway) -> None:
    expecting = post("/api/generate", GENERATE, b"Expect: 100-continue", b"Connection: close")
    head, _, body = expecting.partition(b"\r\n\r\n")
    first = post("/api/generate", STREAM)
    raw = asyncio.run(
        until_closed(gateway.port, first + head + b"\r\n\r\n", body, wait_for=b"100 Continue")
    )
    stream, _, rest = raw.partition(b"0\r\n\r\n")  # the first answer ends with its last chunk
    assert b"100 Continue" not in stream
    assert rest.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")


def test_a_chunked_bodys_trailers_are_not_headers(gateway: Gateway) -> None:
    """A trailer once became a header of the request: here an X-Priority out of range."""
    chunks = b"%x\r\n%s\r\n0\r\nX-Priority: 99\r\n\r\n" % (len(GENERATE), GENERATE)
    head = (
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Priority\r\nConnection: close\r\n\r\n"
    )
    ((status, body),) = answers(asyncio.run(until_closed(gateway.port, head + chunks)))
    assert status.startswith(b"HTTP/1.1 200 OK"), body


def test_a_trailer_that_keeps_coming_is_refused_as_a_head_would_be(gateway: Gateway) -> None:
    """The parser holds a header value whole, growing it by copies: a trailer of megabytes
    grew the gateway's memory (and its CPU time) until the body timeout."""
    head = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"%x\r\n%s\r\n0\r\nX-Padding: " % (len(GENERATE), GENERATE)

    async def send() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))  # read as it comes
        try:
            writer.write(head + chunks)
            async with asyncio.timeout(10):
                for _ in range(64):  # 4 MiB, unless the gateway stops it first
                    if answer.done():
                        break
                    writer.write(b"p" * 65536)
                    await writer.drain()
                return await answer
        except ConnectionError:
            return await answer
        finally:
            writer.close()

    raw = asyncio.run(send())
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]


def test_an_upgrade_request_is_answered_in_http11_and_the_connection_closed(
    gateway: Gateway,
) -> None:
    """What `curl --http2` sends to an http:// URL."""
    h2c = (
        b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    )
    ((status, body),) = answers(asyncio.run(until_closed(gateway.port, h2c)))
    assert status.startswith(b"HTTP/1.1 200 OK")
    assert "version" in orjson.loads(body)
    ahead = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"  # pipelined before it: answered too
    (_, root), (_, version) = answers(asyncio.run(until_closed(gateway.port, ahead + h2c)))
    assert root == b"Ollama is running"
    assert "version" in orjson.loads(version)


def test_an_absolute_form_target_is_served(gateway: Gateway) -> None:
    request = b"GET http://localhost/api/version HTTP/1.1\r\nHost: localhost\r\n"
    ((status, body),) = answers(
        asyncio.run(until_closed(gateway.port, request + b"Connection: close\r\n\r\n"))
    )
    assert status.startswith(b"HTTP/1.1 200 OK")
    assert "version" in orjson.loads(body)


def test_an_answer_given_before_the_body_came_says_the_connection_closes() -> None:
    with (
        sim_server() as backend,
        gateway_with((BackendSettings(url=backend.url),), max_body_bytes=1024) as running,
    ):
        head = b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n"
        ((status, _),) = answers(asyncio.run(until_closed(running.port, head + b"{")))
    assert status.startswith(b"HTTP/1.1 413 ")
    assert b"\r\nConnection: close" in status
    assert b"\r\nDate: " in status


def _connect_all(port: int, count: int) -> list[socket.socket]:
    """`count` connections to `port`, each done (or failed) within 5 s of the last begun: the
    kernel completes the handshakes itself, whatever the server is doing."""
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        clients.append(client)
    pending = set(clients)
    with selectors.DefaultSelector() as waiting:
        for client in clients:
            waiting.register(client, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 5  # the kernel completes them at once, or never
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in waiting.select(left):
                waiting.unregister(key.fileobj)
                pending.discard(key.fileobj)
    assert not pending
    return [c for c in clients if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]


def test_a_burst_of_connections_is_held_by_the_kernel_then_taken_at_once(
    gateway: Gateway,
) -> None:
    """1,000 clients connecting at once must not lose their SYNs while the event loop is busy:
    asyncio's own listen backlog is 100, so the 101st handshake waited for the client's SYN
    retry (1 s, 3 s, ...). The gateway listens with the system's `somaxconn`.

    Once the loop is free, the queued connections are taken in a few turns of it: libuv (under
    uvloop) accepts one connection per turn, so a gateway busy relaying streams, whose turns
    take milliseconds, left a burst in the listen queue for seconds (676 queued, 2.5 s)."""
    server = gateway._server
    assert server is not None
    loop = server.get_loop()
    connections = gateway.connections
    busy, release = threading.Event(), threading.Event()
    turns: list[int] = []
    all_taken = threading.Event()

    def count_turns(before: int, wanted: int, turn: int = 1) -> None:
        if connections.accepted - before >= wanted or turn > 1000:
            turns.append(turn)
            all_taken.set()
        else:
            loop.call_soon(count_turns, before, wanted, turn + 1)

    def hold_the_loop() -> None:
        before = connections.accepted
        busy.set()
        release.wait(30)
        loop.call_soon(count_turns, before, 300)

    loop.call_soon_threadsafe(hold_the_loop)
    assert busy.wait(10)
    clients: list[socket.socket] = []
    try:
        clients = _connect_all(gateway.port, 300)
        assert len(clients) == 300
        release.set()
        assert all_taken.wait(30)
        assert turns[0] <= 10, f"300 queued connections took {turns[0]} turns of the loop"
    finally:
        release.set()
        for client in clients:
            client.close()


def test_bodies_pipelined_behind_a_long_answer_are_read_no_further_than_a_megabyte() -> None:
    """Each pipelined body was held back only past a megabyte of its own: 64 of them just
    under it were 64 MiB read ahead, per connection."""
    config = make_config(decode_tps=20.0, output_tokens=(400, 400))
    with sim_servers(config) as (slow,), gateway_with((BackendSettings(url=slow.url),)) as gw:
        body = orjson.dumps({"model": CHAT_MODEL, "prompt": "x" * (512 * 1024 - 64)})
        ahead = post("/api/generate", body) * 60  # 30 MiB, behind the stream
        with socket.create_connection(("127.0.0.1", gw.port)) as client:
            client.sendall(post("/api/generate", STREAM))
            assert client.recv(1024).startswith(b"HTTP/1.1 200")  # the stream is on
            client.setblocking(False)
            sent = 0
            with selectors.DefaultSelector() as waiting:
                waiting.register(client, selectors.EVENT_WRITE)
                while sent < len(ahead) and waiting.select(timeout=2):  # until it stalls
                    try:
                        sent += client.send(ahead[sent : sent + 65536])
                    except BlockingIOError:
                        continue
    # A megabyte read ahead, and what the kernel buffers on either side (a few MB here).
    assert sent < 16 * 1024 * 1024, sent
