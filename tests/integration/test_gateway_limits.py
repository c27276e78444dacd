"""The gateway against hostile and slow clients, over real sockets: headers sent a byte at a
time, bodies that stop, answers left unread, more connections than it may hold, foreign `Host`
headers (DNS rebinding), and model names of any length."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from parallama.config import BackendSettings
from parallama.gateway.app import Gateway
from parallama.gateway.http.guard import ConnectionLimits, Connections
from parallama.gateway.http.server import Reply, Request, start_server
from parallama.sim.server import SimServer
from tests.rawhelpers import RawRequest, raw_backend
from tests.simhelpers import CHAT_MODEL, gateway_for, gateway_with, sim_server, wait_for_gateway

GENERATE = {"model": CHAT_MODEL, "prompt": "hi", "stream": False}


@contextlib.contextmanager
def gateway(backend_url: str, **settings: Any) -> Iterator[Gateway]:
    with gateway_with((BackendSettings(url=backend_url),), **settings) as running:
        yield running


def address(gateway: Gateway) -> tuple[str, int]:
    return "127.0.0.1", gateway.port


async def until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    async with asyncio.timeout(within):
        return await reader.read()


async def one_answer(reader: asyncio.StreamReader, within: float) -> bytes:
    """One whole answer (head and Content-Length body) from the server."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)


def metric(gateway: Gateway, line_start: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics").text
    return float(
        next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1]
    )


# -- slow clients ---------------------------------------------------------------------------------


def test_clients_that_send_their_head_a_byte_at_a_time_are_cut_off(sim: SimServer) -> None:
    """Slowloris: the head must arrive within header_timeout, however steadily it trickles."""
    head = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 200

    async def dribble(host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in head:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the slow client itself, not a synchronisation

        sending = asyncio.ensure_future(trickle())
        try:
            return await until_closed(reader, 10)
        finally:
            sending.cancel()
            writer.close()

    async def attack(gateway: Gateway) -> tuple[list[bytes], int]:
        answers = asyncio.gather(*(dribble(*address(gateway)) for _ in range(20)))
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            meanwhile = await client.post("/api/generate", json=GENERATE)
        return await answers, meanwhile.status_code

    with gateway(sim.url, header_timeout=1.0) as running:
        answers, meanwhile = asyncio.run(attack(running))
        assert metric(running, 'parallama_client_timeouts_total{phase="head"}') == 20
    assert meanwhile == 200  # normal clients are served during the attack
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    assert all(b"did not arrive within 1 s" in answer for answer in answers)


def test_a_connection_that_never_sends_a_request_is_closed(sim: SimServer) -> None:
    async def silent(host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return await until_closed(reader, 10)
        finally:
            writer.close()

    with gateway(sim.url, header_timeout=0.5) as running:
        assert asyncio.run(silent(*address(running))).startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/api/chat", lambda body: body["error"]),
        ("/v1/chat/completions", lambda b: b["error"]["message"]),
    ],
)
def test_a_body_that_stops_arriving_is_a_408_in_the_routes_format(
    sim: SimServer, path: str, error: Any
) -> None:
    async def stalled(host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
        writer.write(head.encode() + b'{"model": "')  # and then nothing more
        try:
            return await one_answer(reader, 10)
        finally:
            writer.close()

    with gateway(sim.url, body_timeout=0.5) as running:
        answer = asyncio.run(stalled(*address(running)))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert error(orjson.loads(body)) == "the request body stopped arriving for 0.5 s"


@contextlib.asynccontextmanager
async def endless_stream_backend(closed: asyncio.Event) -> AsyncIterator[str]:
    """A backend that streams NDJSON lines as fast as it may write them, forever."""

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.is_probe:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        line = b'{"response":"' + b"x" * 4000 + b'","done":false}\n'
        chunk = b"%x\r\n%s\r\n" % (len(line), line)
        try:
            while True:
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            closed.set()
            raise

    async with raw_backend(answer) as backend:
        yield backend.url


def test_a_client_that_stops_reading_its_answer_is_cut_off_and_the_backend_freed() -> None:
    async def scenario() -> tuple[float, bool]:
        closed = asyncio.Event()
        async with endless_stream_backend(closed) as url:
            with gateway_with((BackendSettings(url=url),), send_timeout=0.5) as running:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, address(running))
                body = orjson.dumps({"model": CHAT_MODEL, "prompt": "hi"})
                head = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n"
                head += b"Content-Length: %d\r\n\r\n" % len(body)
                await asyncio.get_running_loop().sock_sendall(sock, head + body)
                try:  # and never read a byte of the answer
                    async with asyncio.timeout(20):
                        await closed.wait()  # the backend's connection closes: its slot frees
                finally:
                    sock.close()
                timeouts = await asyncio.to_thread(
                    metric, running, 'parallama_client_timeouts_total{phase="send"}'
                )
        return timeouts, closed.is_set()

    timeouts, backend_freed = asyncio.run(scenario())
    assert backend_freed
    assert timeouts == 1


@contextlib.asynccontextmanager
async def big_answer_backend(size: int) -> AsyncIterator[str]:
    """A backend that answers every generation with one JSON object of about `size` bytes."""
    body = b'{"model":"%s","response":"%s","done":true}' % (CHAT_MODEL.encode(), b"x" * size)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    answer += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        return True

    async with raw_backend(reply) as backend:
        yield backend.url


def request_bytes(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_a_small_answer_left_unread_is_cut_off_too() -> None:
    """Under 64 KB left in the gateway's buffer never paused the writing: the connection, and
    its answer, stayed for ever (its close waits for a flush that never comes)."""

    async def scenario() -> float:
        async with big_answer_backend(40_000) as url:
            settings = {"send_timeout": 0.5, "idle_timeout": 1.0}
            with gateway_with((BackendSettings(url=url),), **settings) as running:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                loop = asyncio.get_running_loop()
                await loop.sock_connect(sock, address(running))
                # Its side of the connection small too, so that the answer waits in ours.
                await asyncio.to_thread(small_send_buffers, running)
                await loop.sock_sendall(
                    sock, request_bytes("/api/generate", orjson.dumps(GENERATE))
                )
                try:  # and never read a byte of the answer
                    return await asyncio.to_thread(
                        lambda: wait_for_metric(
                            running, 'parallama_client_timeouts_total{phase="send"}', 1
                        )
                    )
                finally:
                    sock.close()

    assert asyncio.run(scenario()) == 1


def small_send_buffers(gateway: Gateway) -> None:
    """Once the gateway holds the connection: its kernel send buffer as small as it goes."""
    deadline = time.monotonic() + 10
    while not gateway.connections.open and time.monotonic() < deadline:
        time.sleep(0.01)  # the connection is accepted on the gateway's own thread
    for transport in list(gateway.connections.open):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def wait_for_metric(gateway: Gateway, line_start: str, value: float) -> float:
    """The metric once it reaches `value` (read over HTTP until then, or 10 s)."""
    deadline = time.monotonic() + 10
    while (seen := metric(gateway, line_start)) < value and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def test_a_pipelined_request_is_not_timed_out_while_the_answer_before_it_is_read() -> None:
    """The second request's head arrived long ago; the client is slow to read the first
    answer (3 MB): the head deadline must not run, nor a 408 land inside the first answer."""

    async def scenario() -> bytes:
        async with big_answer_backend(3_000_000) as url:
            with gateway_with((BackendSettings(url=url),), header_timeout=0.5) as running:
                reader, writer = await asyncio.open_connection(*address(running))
                one = request_bytes("/api/generate", orjson.dumps(GENERATE))
                writer.write(one)
                async with asyncio.timeout(10):  # the first answer is on its way
                    received = await reader.readexactly(4096)
                writer.write(one)  # pipelined behind it
                await asyncio.sleep(1.5)  # the slow client, reading nothing for 3 head deadlines
                while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
                    async with asyncio.timeout(10):
                        chunk = await reader.read(1 << 20)
                    if not chunk:
                        break
                    received += chunk
                writer.close()
                return received

    received = asyncio.run(scenario())
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert b"HTTP/1.1 408" not in received


def test_an_early_error_with_its_body_still_coming_gets_no_408_after_it(sim: SimServer) -> None:
    async def scenario(gateway: Gateway) -> bytes:
        reader, writer = await asyncio.open_connection(*address(gateway))
        head = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n"
        writer.write(head + b"x" * 100)
        refused = await one_answer(reader, 10)
        await asyncio.sleep(0.8)  # the rest of the body, late, past a head deadline
        writer.write(b"x" * 4900)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                refused += await reader.read()  # nothing more should come
        writer.close()
        return refused

    with gateway(sim.url, max_body_bytes=1024, header_timeout=0.5) as running:
        answer = asyncio.run(scenario(running))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"408" not in answer


# -- too many connections -------------------------------------------------------------------------


def test_past_max_connections_a_client_gets_a_clean_503_and_room_comes_back(
    sim: SimServer,
) -> None:
    version = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def scenario(gateway: Gateway) -> tuple[bytes, int]:
        held = [await asyncio.open_connection(*address(gateway)) for _ in range(3)]
        for reader, writer in held:  # each answered once: the gateway holds all three
            writer.write(version)
            assert (await reader.readuntil(b"}")).startswith(b"HTTP/1.1 200 ")
        reader, writer = await asyncio.open_connection(*address(gateway))
        writer.write(version)
        refused = await until_closed(reader, 10)
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        return refused, await asyncio.to_thread(served_once_room_is_back, gateway.url)

    with gateway(sim.url, max_connections=3, header_timeout=30) as running:
        refused, again = asyncio.run(scenario(running))
        assert metric(running, "parallama_client_connections_refused_total") >= 1
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 1" in head
    assert orjson.loads(body)["error"].startswith("too many open connections (the limit is 3)")
    assert again == 200


async def ok(request: Request, reply: Reply) -> None:
    reply.send(200, b"ok", b"text/plain")


async def test_connections_accepted_in_one_burst_still_respect_the_cap() -> None:
    """The kernel accepts a burst before the event loop sees any of it; the cap must hold for
    the whole burst, not only for connections that came one at a time."""
    connections = Connections(ConnectionLimits(header_timeout=5, send_timeout=5, max_connections=3))
    server = await start_server(ok, connections, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:  # (the loop did not run while they connected)
        for sock in burst:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sock.setblocking(False)
        loop = asyncio.get_running_loop()
        answers = [await loop.sock_recv(sock, 4096) for sock in burst]
    finally:
        for sock in burst:
            sock.close()
        server.close()
        await server.wait_closed()
    statuses = sorted(answer.split(b" ", 2)[1] for answer in answers)
    assert statuses == [b"200"] * 3 + [b"503"] * 17


def served_once_room_is_back(url: str) -> int:
    """A generation's status, once the gateway has seen connections close (it learns of it
    asynchronously, so a first try may still find it full: that is the state polled here)."""
    deadline = time.monotonic() + 10
    while True:
        reply = httpx.post(f"{url}/api/generate", json=GENERATE, timeout=10)
        if reply.status_code != 503 or time.monotonic() > deadline:
            return reply.status_code
        time.sleep(0.01)


# -- the Host check -------------------------------------------------------------------------------


def test_a_foreign_host_is_refused_on_loopback_in_the_routes_format(sim: SimServer) -> None:
    with gateway(sim.url) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        evil = {"Host": "attacker.example"}
        ollama_route = http.post("/api/generate", json=GENERATE, headers=evil)
        openai_route = http.post(
            "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers=evil,
        )
        local = http.post("/api/generate", json=GENERATE, headers={"Host": "localhost:11434"})
        by_address = http.get("/api/version", headers={"Host": f"127.0.0.1:{running.port}"})
        status = http.get("/parallama/status").json()
    assert ollama_route.status_code == openai_route.status_code == 403
    assert "host 'attacker.example' is not allowed" in ollama_route.json()["error"]
    assert "allowed_hosts" in openai_route.json()["error"]["message"]
    assert (local.status_code, by_address.status_code) == (200, 200)
    assert status["rejected"] == 0 and status["total"] == 1  # refused before it was a request


def test_allowed_hosts_widens_the_check(sim: SimServer) -> None:
    hosts = ("llm.example.com", ".corp.example")
    with gateway(sim.url, allowed_hosts=hosts) as running:
        codes = [
            httpx.get(f"{running.url}/api/version", headers={"Host": host}).status_code
            for host in ("llm.example.com", "a.b.corp.example", "corp.example", "other.com")
        ]
    assert codes == [200, 200, 200, 403]


# -- strings from clients -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/chat", {"messages": []}, lambda b: b["error"]),
        ("/v1/chat/completions", {"messages": []}, lambda b: b["error"]["message"]),
        ("/api/embed", {"input": "x"}, lambda b: b["error"]),
    ],
)
def test_a_model_name_longer_than_ollamas_limits_is_a_400(
    sim: SimServer, path: str, body: dict[str, Any], error: Any
) -> None:
    with gateway(sim.url) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        huge = http.post(path, json={**body, "model": "m" * 2_000_000})
        long_tag = http.post(path, json={**body, "model": "qwen2.5:" + "7" * 81})
    for reply in (huge, long_tag):
        assert reply.status_code == 400
        assert error(reply.json()).startswith("invalid model name: ")
    assert error(huge.json()).endswith(
        "its model part is 2000000 bytes, more than Ollama's limit of 80"
    )
    assert len(huge.content) < 200


def test_model_names_clients_make_up_do_not_grow_the_metrics() -> None:
    with sim_server() as server, gateway_for([server], health_interval=0.1) as running:
        wait_for_gateway(running.url, lambda s: s["backends"][0]["installed"] is not None)
        with httpx.Client(base_url=running.url, timeout=10) as http:
            httpx_ok = http.post("/api/generate", json=GENERATE)
            made_up = [
                http.post("/api/generate", json={"model": f"{i}{'n' * 78}", "prompt": "x"})
                for i in range(20)
            ]
            metrics = http.get("/metrics").text
    assert httpx_ok.status_code == 200
    assert {reply.status_code for reply in made_up} == {404}
    assert "nnnnnnnnnn" not in metrics
    assert f'model="{CHAT_MODEL}"' in metrics
    assert 'parallama_requests_total{model="_other",outcome="rejected"} 20.0' in metrics
    assert len(metrics) < 50_000


def test_under_a_low_file_limit_a_flood_of_slow_clients_gets_clean_answers(
    sim: SimServer, tmp_path: Path
) -> None:
    """With 256 descriptors, 150 slow clients once took them all and normal requests got
    resets. Now at most half the limit are client connections, the rest are refused with a 503,
    the slow ones are cut off at the head deadline, and the gateway serves again."""

    log = tmp_path / "serve.log"
    args = ["--backend", sim.url, "--port", "0", "--header-timeout", "2"]
    serve = shlex.join([sys.executable, "-m", "parallama", "serve", *args])
    process = subprocess.Popen(  # the shell's ulimit sets both the soft and the hard limit
        ["sh", "-c", f"ulimit -n 256 && exec {serve}"],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    try:
        assert process.stdout is not None
        url = re.search(r"gateway on (http://\S+)", process.stdout.readline())
        assert url, log.read_text()
        host, port = url.group(1).removeprefix("http://").rsplit(":", 1)

        async def flood() -> tuple[list[bytes], list[int]]:
            async def slow_client() -> bytes:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /api/generate HTTP/1.1\r\n")  # and no more
                try:
                    return await until_closed(reader, 20)
                finally:
                    writer.close()

            clients = asyncio.gather(*(slow_client() for _ in range(150)))
            async with httpx.AsyncClient(base_url=url.group(1), timeout=10) as client:
                during = [(await client.post("/api/generate", json=GENERATE)).status_code]
            return await clients, during

        answers, during = asyncio.run(flood())
        after = httpx.post(f"{url.group(1)}/api/generate", json=GENERATE, timeout=10)
    finally:
        process.terminate()
        process.wait(10)
    statuses = [answer.split(b" ", 2)[1] for answer in answers]
    assert set(statuses) <= {b"408", b"503"} and statuses.count(b"408") <= 96
    assert statuses.count(b"503") >= 150 - 96  # refused cleanly, not reset
    assert set(during) <= {200, 503}
    assert after.status_code == 200
    assert "max_connections lowered to fit the file limit" in log.read_text()


async def test_the_send_deadline_still_runs_after_the_client_took_some_of_a_whole_answer() -> None:
    """The client reads part of an answer (the server resumes writing), then stops: what is
    left must still be taken within send_timeout, or the connection goes. Making room once
    switched the deadline off for good (found by review)."""

    async def big(request: Request, reply: Reply) -> None:
        reply.send(200, b"x" * 300_000, b"text/plain")

    limits = ConnectionLimits(header_timeout=5, send_timeout=1, max_connections=8, idle_timeout=1)
    connections = Connections(limits)
    server = await start_server(big, connections, "127.0.0.1", 0)
    # Small kernel buffers on both sides, so that the answer waits in the server's own.
    server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted inherit
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, server.sockets[0].getsockname())
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await loop.sock_recv(sock, 2048)  # the answer has begun: its connection is known
        ((transport, connection),) = connections.open.items()
        async with asyncio.timeout(10):  # read until the server has made room, bytes left
            while connection.paused or not transport.get_write_buffer_size():  # type: ignore[attr-defined]
                await loop.sock_recv(sock, 2048)
        await asyncio.sleep(3 * limits.send_timeout)  # and then the client reads nothing
    finally:
        sock.close()
        server.close()
        await server.wait_closed()
    assert connections.timeouts["send"] == 1
    assert not connections.open
