"""Readiness and liveness, as Kubernetes probes and load balancers ask them, and stopping
without cutting what is in flight: SIGTERM closes the listening sockets, lets every answer
being written finish, then exits; a second signal stops at once."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import orjson

from parallama.config import BackendSettings
from parallama.launch.supervisor import free_port
from tests.redishelpers import RedisServer
from tests.simhelpers import CHAT_MODEL, eventually, gateway_with, sim_server


def _ready(url: str) -> tuple[int, dict[str, object]]:
    answer = httpx.get(f"{url}/parallama/ready", timeout=10)
    return answer.status_code, answer.json()


def test_live_and_ready_say_whether_the_gateway_can_take_traffic() -> None:
    with sim_server() as sim, gateway_with((BackendSettings(url=sim.url),)) as gateway:
        live = httpx.get(f"{gateway.url}/parallama/live", timeout=10)
        assert (live.status_code, live.json()) == (200, {"status": "live"})
        assert _ready(gateway.url) == (200, {"ready": True})
        assert httpx.head(f"{gateway.url}/parallama/ready", timeout=10).status_code == 200


def test_not_ready_while_no_backend_can_take_work() -> None:
    """Its one backend down: the gateway lives, but sends no traffic its way (it would only
    answer 503s), and says why without naming the backend."""
    gone = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    settings = {"health_interval": 0.1, "failure_threshold": 1}
    with gateway_with((BackendSettings(url=gone),), **settings) as gateway:
        _, body = eventually(lambda: _ready(gateway.url), lambda r: r[0] == 503)
        assert body == {
            "ready": False,
            "reasons": ["no backend can take work: each is down, draining or offline"],
        }
        assert "127.0.0.1" not in str(body)
        assert httpx.get(f"{gateway.url}/parallama/live", timeout=10).status_code == 200


def test_not_ready_while_the_shared_state_does_not_answer(redis: RedisServer) -> None:
    with (
        sim_server() as sim,
        gateway_with((BackendSettings(url=sim.url),), state=redis.url) as gateway,
    ):
        assert _ready(gateway.url) == (200, {"ready": True})
        redis.kill()
        try:
            _, body = eventually(lambda: _ready(gateway.url), lambda r: r[0] == 503, 30)
            assert body["reasons"] == ["the shared state (Redis) does not answer"]
        finally:
            redis.start()
        eventually(lambda: _ready(gateway.url), lambda r: r[0] == 200, 30)


@contextmanager
def _serving(backend: str, *flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    argv = [sys.executable, "-m", "parallama", "serve", "--backend", backend, "--port", "0"]
    process = subprocess.Popen(
        [*argv, "--no-log-requests", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        found = re.search(r"gateway on (http://\S+)", process.stdout.readline())
        assert found, "the gateway did not start"
        yield process, found.group(1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _stream(url: str, tokens: int) -> tuple[socket.socket, bytes]:
    """A generation streamed on a raw connection; returns it after its first line."""
    body = orjson.dumps(
        {"model": CHAT_MODEL, "prompt": "count", "options": {"num_predict": tokens}}
    )
    connection = socket.create_connection(_address(url), timeout=30)
    connection.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    received = b""
    while b'"done":false' not in received:
        piece = connection.recv(65536)
        assert piece, received
        received += piece
    return connection, received


def _rest(connection: socket.socket) -> bytes:
    received = b""
    while piece := connection.recv(65536):
        received += piece
    return received


def _chunked_body(answer: bytes) -> bytes:
    """The body of a whole chunked answer (a chunk may hold more than one line)."""
    rest = answer.split(b"\r\n\r\n", 1)[1]
    body = b""
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


def _refused(url: str) -> bool:
    try:
        socket.create_connection(_address(url), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_the_streams_in_flight_finish_and_takes_no_new_connection() -> None:
    with (
        sim_server(decode_tps=20.0, output_tokens=(40, 40)) as sim,
        _serving(sim.url, "--drain-timeout", "30") as (process, url),
    ):
        idle = socket.create_connection(_address(url), timeout=30)
        idle.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive, idle now
        stream, begun = _stream(url, 40)  # two seconds of tokens

        process.send_signal(signal.SIGTERM)
        eventually(lambda: _refused(url), bool)  # a balancer's next try goes elsewhere
        assert idle.recv(65536) == b""  # the idle connection was closed
        answer = begun + _rest(stream)  # ... and the stream ran to its end
        assert process.wait(30) == 0

    lines = [orjson.loads(line) for line in _chunked_body(answer).splitlines()]
    assert lines[-1]["done"] is True
    assert sum(1 for line in lines if not line["done"]) == 40


def test_a_second_signal_stops_at_once() -> None:
    with (
        sim_server(decode_tps=20.0, output_tokens=(400, 400)) as sim,
        _serving(sim.url, "--drain-timeout", "60") as (process, url),
    ):
        stream, _ = _stream(url, 400)  # twenty seconds of tokens
        process.send_signal(signal.SIGTERM)
        eventually(lambda: _refused(url), bool)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0  # long before the stream could have ended
        assert b'"done":true' not in _rest(stream)
