"""Backends declared `kind = "openai"`: Ollama clients are answered in Ollama's format although
the engine behind speaks only OpenAI's dialect.

The engine here is the emulator, told to be OpenAI-only: the gateway must then use nothing but
its `/v1` routes (an `/api/*` request reaching it would be a translation that did not happen).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest

from parallama.config import BackendSettings
from parallama.gateway.app import Gateway
from tests.rawhelpers import RawRequest, raw_backend
from tests.simhelpers import (
    CHAT_MODEL,
    EMBED_MODEL,
    gateway_with,
    make_config,
    sim_servers,
    state,
    wait_for_gateway,
)

FAST_HEALTH = {"health_interval": 0.05, "health_timeout": 1.0}


@contextmanager
def openai_engine_gateway() -> Iterator[tuple[Gateway, str]]:
    with sim_servers(make_config(num_parallel=2, output_tokens=(30, 40))) as servers:
        engine = servers[0].url
        backend = BackendSettings(url=engine, kind="openai", slots=2)
        with gateway_with((backend,), **FAST_HEALTH) as gateway:
            wait_for_gateway(gateway.url, lambda s: s["backends"][0]["installed"])
            yield gateway, engine


def native_requests(engine: str) -> int:
    """How many Ollama-API generations the engine saw (the emulator counts by route)."""
    routes: dict[str, int] = state(engine)["requests_by_route"]
    return sum(n for route, n in routes.items() if route.startswith("/api/"))


def test_ollama_client_chats_streaming_and_not_through_an_openai_engine() -> None:
    with openai_engine_gateway() as (gateway, engine):
        client = ollama.Client(host=gateway.url)
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        whole = client.chat(model=CHAT_MODEL, messages=messages, options={"num_predict": 12})
        assert whole.message.role == "assistant"
        assert whole.message.content
        assert whole.done and whole.done_reason == "length"
        assert whole.eval_count == 12
        assert whole.prompt_eval_count and whole.prompt_eval_count > 0
        assert whole.total_duration and whole.eval_duration

        chunks = list(client.chat(model=CHAT_MODEL, messages=messages, stream=True))
        assert len(chunks) > 2
        assert all(not c.done for c in chunks[:-1])
        final = chunks[-1]
        assert final.done and final.done_reason in ("stop", "length")
        assert final.eval_count == len(chunks) - 1  # one chunk per generated token
        text = "".join(c.message.content or "" for c in chunks)
        assert text.strip()

        # `think` goes as the engine takes it (chat_template_kwargs), which it accepts.
        generated = client.generate(model=CHAT_MODEL, prompt="Say hi", stream=False, think=False)
        assert generated.response and generated.done
        assert native_requests(engine) == 0  # all of it went to /v1


def test_embeddings_are_translated_and_normalised() -> None:
    with openai_engine_gateway() as (gateway, engine):
        reply = ollama.Client(host=gateway.url).embed(model=EMBED_MODEL, input=["a", "b c"])
        assert len(reply.embeddings) == 2
        for vector in reply.embeddings:
            assert sum(x * x for x in vector) == pytest.approx(1.0)
        assert native_requests(engine) == 0


def test_openai_clients_pass_straight_through() -> None:
    with openai_engine_gateway() as (gateway, _):
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
        completion = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_listings_show_what_the_engine_serves() -> None:
    with openai_engine_gateway() as (gateway, _):
        tags = ollama.Client(host=gateway.url).list()
        assert CHAT_MODEL in {m.model for m in tags.models}
        running = httpx.get(f"{gateway.url}/api/ps", timeout=5).json()["models"]
        assert CHAT_MODEL in {m["name"] for m in running}  # the engine keeps it loaded


def test_errors_come_back_in_ollamas_format() -> None:
    with openai_engine_gateway() as (gateway, _):
        bad = httpx.post(
            f"{gateway.url}/api/chat",
            json={"model": CHAT_MODEL, "messages": [{"content": "no role"}]},
            timeout=5,
        )
        assert bad.status_code == 400
        assert bad.json() == {"error": "each message needs a role"}
        show = httpx.post(f"{gateway.url}/api/show", json={"model": "ghost"}, timeout=5)
        assert show.status_code == 404
        assert show.json() == {"error": "model 'ghost' not found"}
        status = httpx.get(f"{gateway.url}/parallama/status", timeout=5).json()
        assert status["rejected"] == 1  # counted, not lost
        assert status["in_flight"] == 0


def test_a_load_request_is_answered_without_work() -> None:
    with openai_engine_gateway() as (gateway, engine):
        before = state(engine)["requests_by_route"]
        reply = httpx.post(
            f"{gateway.url}/api/generate", json={"model": CHAT_MODEL, "stream": False}, timeout=5
        )
        assert reply.json()["done_reason"] == "load"
        assert state(engine)["requests_by_route"] == before


@contextlib.asynccontextmanager
async def engine_that_dies_after_its_first_chunk() -> AsyncIterator[str]:
    """An OpenAI engine that lists one model, starts a stream with a chunk that carries no
    text (as llama.cpp's first one, the role), and is gone."""
    listing = orjson.dumps({"object": "list", "data": [{"id": CHAT_MODEL}]})

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.line.startswith(b"GET /v1/models"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(listing))
            writer.write(listing)
            return True
        if request.is_probe:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return True
        role = b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(role), role))
        await writer.drain()
        return False

    async with raw_backend(answer) as backend:
        yield backend.url


def test_a_stream_that_fails_before_its_first_text_moves_to_another_engine() -> None:
    """Nothing had reached the client yet, not even the status line: another engine answers."""

    async def scenario(healthy: str) -> tuple[int, list[dict[str, Any]], str]:
        async with engine_that_dies_after_its_first_chunk() as broken:
            backends = (
                BackendSettings(url=broken, kind="openai", weight=100),  # chosen first
                BackendSettings(url=healthy, kind="openai"),
            )
            with gateway_with(backends, routing="weighted", **FAST_HEALTH) as gateway:
                body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
                async with httpx.AsyncClient(timeout=30) as client:
                    async with client.stream("POST", f"{gateway.url}/api/chat", json=body) as reply:
                        lines = [orjson.loads(line) async for line in reply.aiter_lines() if line]
                    metrics = (await client.get(f"{gateway.url}/metrics")).text
                return reply.status_code, lines, metrics

    with sim_servers(make_config(output_tokens=(5, 5))) as (engine,):
        status, lines, metrics = asyncio.run(scenario(engine.url))
    assert status == 200
    assert lines[-1]["done"] is True
    assert "".join(line["message"]["content"] for line in lines)
    assert not any("error" in line for line in lines)
    assert re.search(r"parallama_failovers_total\{[^}]*\} 1\.0", metrics)
