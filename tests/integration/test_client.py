"""`parallama.client` against the emulator, the gateway and hand-written servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from parallama.client import (
    AsyncClient,
    Client,
    ClientError,
    ResponseError,
    RetryPolicy,
    TransportError,
    UnreachableError,
)
from tests.rawhelpers import RawRequest, raw_backend
from tests.simhelpers import (
    CHAT_MODEL,
    EMBED_MODEL,
    eventually,
    gateway_for,
    in_thread,
    make_config,
    model_state,
    sim_server,
    sim_servers,
    state,
    wait_for_state,
)

HI = [{"role": "user", "content": "hi"}]


def test_the_common_calls_as_the_official_client_makes_them() -> None:
    with (
        sim_servers(make_config(ports=2)) as servers,
        gateway_for(servers) as gateway,
        Client(gateway.url) as client,
    ):
        reply = client.chat(CHAT_MODEL, HI, options={"num_predict": 5})
        assert reply.message.role == "assistant"
        assert reply["eval_count"] == 5
        chunks = list(client.chat(CHAT_MODEL, HI, stream=True))
        assert chunks[-1].done and not any(c.done for c in chunks[:-1])
        assert client.generate(CHAT_MODEL, "Why?").response
        assert len(client.embed(EMBED_MODEL, ["a", "b"]).embeddings) == 2
        assert CHAT_MODEL in {m.name for m in client.list().models}
        assert CHAT_MODEL in {m.name for m in client.ps().models}
        assert client.show(CHAT_MODEL).details.family == "qwen2"
        with pytest.raises(ResponseError, match="model 'absent:1b' not found") as missing:
            client.chat("absent:1b", HI)
        assert missing.value.status_code == 404


def test_one_pooled_connection_serves_many_calls() -> None:
    with sim_server() as server:
        before = state(server.url)["connections_accepted"]
        with Client(server.url) as client:
            for _ in range(10):
                client.chat(CHAT_MODEL, HI)
            list(client.chat(CHAT_MODEL, HI, stream=True))
        # Ten calls and a stream on one connection, plus the one /_sim/state itself opens.
        assert state(server.url)["connections_accepted"] - before == 2


@dataclass(frozen=True)
class Cut:
    """Send these bytes, then close the connection (an answer broken off)."""

    data: bytes


@dataclass
class Scripted:
    """A hand-written HTTP server. Each POST gets the next of `answers`: raw bytes, `Cut`, or
    None (close without a word); a GET (the client's health check) gets `version`, or the
    connection closed when it is None. It records when each POST came."""

    answers: list[bytes | Cut | None]
    version: bytes | None = None
    times: list[float] = field(default_factory=list)
    url: str = ""


@contextlib.contextmanager
def scripted(*answers: bytes | Cut | None) -> Iterator[Scripted]:
    """A `Scripted` server on its own thread (the sync client blocks the test's)."""
    script = Scripted(list(answers))

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.is_probe:
            reply: bytes | Cut | None = script.version
        else:
            script.times.append(time.monotonic())
            reply = script.answers.pop(0) if script.answers else None
        if reply is None:
            return False
        writer.write(reply.data if isinstance(reply, Cut) else reply)
        return not isinstance(reply, Cut)

    with in_thread(lambda: raw_backend(answer)) as backend:
        script.url = backend.url
        yield script


def http(status: str, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


DONE = b'{"model":"m","message":{"role":"assistant","content":"ok"},"done":true}'
BUSY = http("503 Service Unavailable", b'{"error":"server busy"}', "Retry-After: 1")


def test_a_retry_waits_as_long_as_retry_after_says() -> None:
    with scripted(BUSY, http("200 OK", DONE)) as server, Client(server.url) as client:
        assert client.chat("m", HI).message.content == "ok"
        assert len(server.times) == 2
        assert server.times[1] - server.times[0] >= 1.0  # Retry-After: 1


def test_client_errors_are_not_retried_and_busy_ones_are_given_up_on() -> None:
    bad = http("400 Bad Request", b'{"error":"messages must be a list"}')
    policy = RetryPolicy(retries=2, backoff=0.01)
    with scripted(bad) as server, Client(server.url, retry=policy) as client:
        with pytest.raises(ResponseError, match="messages must be a list"):
            client.chat("m", HI)
        assert len(server.times) == 1
    fast_busy = http("503 Service Unavailable", b'{"error":"server busy"}')
    with scripted(fast_busy, fast_busy, fast_busy) as server, Client(server.url, retry=policy) as c:
        with pytest.raises(ResponseError, match="server busy") as busy:
            c.chat("m", HI)
        assert busy.value.status_code == 503
        assert len(server.times) == 3  # the first try and two retries


def test_failover_skips_a_dead_endpoint_and_finds_it_again_when_it_is_back() -> None:
    with sim_server() as healthy, scripted(None, None, None) as dead:  # closed without a word
        client = Client([dead.url, healthy.url], failure_threshold=3, recheck_interval=0.05)
        with client:
            for _ in range(10):
                assert client.chat(CHAT_MODEL, HI).done
            assert len(dead.times) == 3  # after three failures it was not tried again
            assert client.endpoints.open() == [dead.url]
            # Back: it answers the background check, and takes its turn again.
            dead.version = http("200 OK", b'{"version":"0.1"}')
            dead.answers[:] = [http("200 OK", DONE)]
            eventually(client.endpoints.open, lambda opened: opened == [])
            replies = [client.chat(CHAT_MODEL, HI) for _ in range(2)]
            assert {r.model for r in replies} == {CHAT_MODEL, "m"}  # one from each


def test_no_endpoint_at_all_is_an_unreachable_error() -> None:
    policy = RetryPolicy(retries=1, backoff=0.01)
    with (
        Client(["127.0.0.1:9", "http://127.0.0.1:9"], retry=policy) as client,
        pytest.raises(UnreachableError, match=r"127\.0\.0\.1:9"),
    ):
        client.chat("m", HI)


def test_a_stream_is_never_retried_after_its_first_chunk() -> None:
    first = b'{"model":"m","message":{"role":"assistant","content":"Hel"},"done":false}\n'
    cut = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(first), first)
    )
    with scripted(Cut(cut), http("200 OK", DONE)) as server, Client(server.url) as client:
        stream = client.chat("m", HI, stream=True)
        assert next(stream).message.content == "Hel"
        with pytest.raises(ClientError) as broken:
            list(stream)
        assert isinstance(broken.value, TransportError)  # the library's error, not httpx's
        assert not isinstance(broken.value, httpx.HTTPError)
        assert "incomplete" in str(broken.value)
        assert len(server.times) == 1  # the rest of the script was never asked for


def test_ollama_host_is_where_a_client_without_a_host_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with sim_server() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url.removeprefix("http://"))  # as users set it
        with Client() as client:
            assert client.chat(CHAT_MODEL, HI).done


def test_requests_go_through_the_transport_given() -> None:
    class Counting(httpx.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.paths: list[str] = []

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.paths.append(request.url.path)
            return super().handle_request(request)

    transport = Counting()
    with sim_server() as server, Client(server.url, transport=transport) as client:
        client.chat(CHAT_MODEL, HI)
        client.list()
    assert transport.paths == ["/api/chat", "/api/tags"]


def test_cancelling_an_async_stream_frees_the_servers_slot() -> None:
    async def scenario(url: str) -> None:
        async with AsyncClient(url) as client:
            got_one = asyncio.Event()

            async def read() -> None:
                async for _ in await client.chat(CHAT_MODEL, HI, stream=True):
                    got_one.set()

            task = asyncio.create_task(read())
            await got_one.wait()
            assert model_state(state(url), CHAT_MODEL)["busy"] == 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with sim_server(decode_tps=20, output_tokens=(200, 200)) as server:
        asyncio.run(scenario(server.url))
        wait_for_state(server.url, lambda s: model_state(s, CHAT_MODEL)["busy"] == 0)
        assert state(server.url)["outcomes"].get("cancelled") == 1


def test_gather_bounds_concurrency_and_keeps_each_result_in_its_place() -> None:
    async def scenario(url: str) -> tuple[list[str | BaseException], int]:
        running = peak = 0

        async with AsyncClient(url) as client:

            async def ask(model: str) -> str:
                nonlocal running, peak
                running += 1
                peak = max(peak, running)
                try:
                    reply = await client.chat(model, HI)
                    return str(reply.model)
                finally:
                    running -= 1

            models = [CHAT_MODEL] * 3 + ["absent:1b"] + [CHAT_MODEL] * 4
            results = await client.map(ask, models, concurrency=2)
            return results, peak

    with sim_server(num_parallel=8) as server:
        results, peak = asyncio.run(scenario(server.url))
    assert peak == 2
    assert results[:3] == [CHAT_MODEL] * 3 and results[4:] == [CHAT_MODEL] * 4
    assert isinstance(results[3], ResponseError) and results[3].status_code == 404
