"""What an operator sees and relies on: metrics, request logs, time limits, failing backends."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
import httpx
import ollama
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from parallama.config import BackendSettings
from parallama.gateway.http.upstream import DROPPED
from parallama.logs import JsonFormatter, LogfmtFormatter
from tests.rawhelpers import RawRequest, raw_backend
from tests.simhelpers import (
    CHAT_MODEL,
    gateway_for,
    gateway_status,
    gateway_with,
    make_config,
    model_state,
    sim_servers,
    state,
    wait_for_gateway,
    wait_for_state,
    with_ports,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of `GET /metrics`, by name and labels."""
    reply = httpx.get(f"{url}/metrics")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_tokens_and_first_tokens() -> None:
    config = with_ports(make_config(output_tokens=(5, 9)), 2)
    with sim_servers(config) as servers, gateway_for(servers) as gateway:
        client = ollama.Client(host=gateway.url)
        generated = 0
        for i in range(3):
            chunks = list(client.generate(model=CHAT_MODEL, prompt=f"q{i}", stream=True))
            generated += chunks[-1].eval_count or 0
        reply = client.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
        generated += reply.eval_count or 0
        missing = httpx.post(f"{gateway.url}/api/chat", json={"messages": []})
        assert missing.status_code == 400
        samples = scrape(gateway.url)
    model = CHAT_MODEL
    assert value(samples, "parallama_requests_total", model=model, outcome="completed") == 4
    assert value(samples, "parallama_requests_total", model="_other", outcome="rejected") == 1
    assert value(samples, "parallama_generated_tokens_total", model=model) == generated
    # Time to first token is measured for the three streams only; durations for all four.
    assert value(samples, "parallama_time_to_first_token_seconds_count", model=model) == 3
    assert value(samples, "parallama_request_duration_seconds_count", model=model) == 4
    assert value(samples, "parallama_generation_tokens_per_second_count", model=model) == 4
    backends = [s.url for s in servers]
    sent = [
        value(samples, "parallama_backend_requests_total", backend=b, outcome="completed")
        for b in backends
    ]
    assert sum(sent) == 4
    for backend in backends:
        assert value(samples, "parallama_backend_slots", backend=backend) == 1
        assert value(samples, "parallama_backend_healthy", backend=backend) == 1
        assert value(samples, "parallama_backend_in_flight", backend=backend) == 0


async def test_metrics_show_the_queue_and_in_flight_while_busy() -> None:
    config = make_config(num_parallel=1, decode_tps=20, output_tokens=(100, 100))
    with sim_servers(config) as servers, gateway_for(servers) as gateway:
        async with aiohttp.ClientSession() as session:
            body = {"model": CHAT_MODEL, "prompt": "slow"}
            running = await session.post(f"{gateway.url}/api/generate", json=body)
            queued = asyncio.create_task(session.post(f"{gateway.url}/api/generate", json=body))
            await asyncio.to_thread(wait_for_gateway, gateway.url, lambda s: s["queue_size"] == 1)
            samples = await asyncio.to_thread(scrape, gateway.url)
            running.close()
            (await queued).close()
    assert value(samples, "parallama_queue_depth", model=CHAT_MODEL) == 1
    assert value(samples, "parallama_backend_in_flight", backend=servers[0].url) == 1


@contextmanager
def captured_access_log() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("parallama.access")
    handler = Keep()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def test_request_log_has_what_operators_need_and_never_the_prompt_or_key() -> None:
    secret_prompt = "my password is hunter2"
    api_key = "sk-very-secret-key"
    with (
        sim_servers(make_config()) as servers,
        gateway_for(servers) as gateway,
        captured_access_log() as records,
    ):
        reply = httpx.post(
            f"{gateway.url}/api/generate",
            json={"model": CHAT_MODEL, "prompt": secret_prompt, "stream": False},
            headers={"Authorization": f"Bearer {api_key}"},
        )
        assert reply.status_code == 200
        httpx.get(f"{gateway.url}/metrics")  # logged at debug level only
    [record] = records
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["model"] == CHAT_MODEL
    assert fields["status"] == 200
    assert fields["outcome"] == "completed"
    assert fields["backend"] == servers[0].url
    assert fields["client"].startswith("key:")
    assert fields["generated_tokens"] == reply.json()["eval_count"]
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert secret_prompt not in line
        assert api_key not in line
        assert CHAT_MODEL in line
    assert orjson.loads(JsonFormatter().format(record))["event"] == "request"


async def test_queue_timeout_is_503_with_the_reason() -> None:
    config = make_config(num_parallel=1, decode_tps=20, output_tokens=(100, 100))
    with sim_servers(config) as servers, gateway_for(servers, queue_timeout=0.3) as gateway:
        async with aiohttp.ClientSession() as session:
            body = {"model": CHAT_MODEL, "prompt": "slow"}
            running = await session.post(f"{gateway.url}/api/generate", json=body)
            async with session.post(f"{gateway.url}/api/generate", json=body) as waited:
                assert waited.status == 503
                assert "Retry-After" in waited.headers
                error = (await waited.json())["error"]
            running.close()
        status = gateway_status(gateway.url)
    assert error == "timed out after 0.3 s waiting in the queue"
    assert status["timed_out"] == 1
    assert (
        status["total"]
        == sum(status[k] for k in ("completed", "rejected", "timed_out", "cancelled", "failed"))
        + status["in_flight"]
        + status["queued"]
    )


def test_silent_backend_is_504_and_its_slot_is_freed() -> None:
    config = make_config(num_parallel=1, decode_tps=20, output_tokens=(100, 100))
    with sim_servers(config) as servers, gateway_for(servers, request_timeout=0.3) as gateway:
        reply = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        wait_for_state(servers[0].url, lambda s: model_state(s, CHAT_MODEL)["busy"] == 0)
        status = gateway_status(gateway.url)
    assert reply.status_code == 504
    assert reply.json()["error"]["message"].endswith("was silent for 0.3 s")
    assert (status["failed"], status["active"]) == (1, 0)


def test_unreachable_backend_is_502_in_the_routes_dialect() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # nothing listens here once it is closed
    with gateway_with((BackendSettings(url=f"http://127.0.0.1:{port}"),)) as gateway:
        native = httpx.post(f"{gateway.url}/api/chat", json={"model": CHAT_MODEL})
        compatible = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "m", "input": "x"})
    assert native.status_code == compatible.status_code == 502
    unreachable = f"backend http://127.0.0.1:{port} could not be reached"
    assert native.json()["error"].startswith(unreachable)
    assert compatible.json()["error"]["type"] == "api_error"


@asynccontextmanager
async def backend_that_dies_mid_stream(content_type: str, first: bytes) -> AsyncIterator[str]:
    """A server that starts a streamed answer, sends one chunk, and drops the connection: what
    a crashing engine looks like on the wire."""

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
        writer.write(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        return False

    async with raw_backend(answer) as backend:
        yield backend.url


@pytest.mark.parametrize("dialect", ["ollama", "openai"])
async def test_stream_cut_by_the_backend_ends_with_an_error_chunk(dialect: str) -> None:
    if dialect == "ollama":
        path, content_type, first = "/api/chat", "application/x-ndjson", b'{"done":false}\n'
    else:
        path, content_type, first = "/v1/chat/completions", "text/event-stream", b"data: {}\n\n"
    async with backend_that_dies_mid_stream(content_type, first) as backend:
        with gateway_with((BackendSettings(url=backend),)) as gateway:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    gateway.url + path, json={"model": CHAT_MODEL, "stream": True}
                ) as reply,
            ):
                body = await reply.read()
            status = await asyncio.to_thread(gateway_status, gateway.url)
    assert reply.status == 200
    assert body.startswith(first)
    last = body[len(first) :].strip()
    if dialect == "ollama":
        error = orjson.loads(last)["error"]
        assert error.endswith(DROPPED)
    else:
        assert last.startswith(b"data: ")
        assert orjson.loads(last.removeprefix(b"data: "))["error"]["type"] == "api_error"
    assert (status["failed"], status["active"]) == (1, 0)


def test_oversized_body_is_413_and_counted_as_rejected() -> None:
    with (
        sim_servers(make_config()) as servers,
        gateway_for(servers, max_body_bytes=2048) as gateway,
    ):
        big = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
        reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=big)
        status = gateway_status(gateway.url)
        backend = state(servers[0].url)
    assert reply.status_code == 413
    assert reply.json()["error"]["message"] == "request body is larger than 2048 bytes"
    assert (status["total"], status["rejected"]) == (1, 1)
    assert backend["outcomes"] == {}  # nothing was forwarded
