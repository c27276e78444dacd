"""The gateway in front of real emulated Ollama servers, used through the official clients."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import ollama
import openai
import pytest

from parallama.config import BackendSettings
from parallama.gateway.app import Gateway
from tests.simhelpers import (
    CHAT_MODEL,
    EMBED_MODEL,
    gateway_for,
    gateway_with,
    make_config,
    model_state,
    sim_servers,
    state,
    wait_for_gateway,
    wait_for_state,
    with_ports,
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with sim_servers(with_ports(make_config(), 2)) as servers, gateway_for(servers) as running:
        yield running


def test_official_ollama_client_through_the_gateway(gateway: Gateway) -> None:
    client = ollama.Client(host=gateway.url)
    reply = client.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.done
    assert reply.message.content
    chunks = list(client.generate(model=CHAT_MODEL, prompt="stream please", stream=True))
    assert chunks[-1].done
    assert chunks[-1].eval_count == len(chunks) - 1
    assert len(client.embed(model=EMBED_MODEL, input=["a", "b"]).embeddings) == 2


def test_official_openai_client_through_the_gateway(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=3
    )
    assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) == 3
    assert client.embeddings.create(model=EMBED_MODEL, input="x").data[0].embedding


def test_bad_input_is_answered_by_the_gateway(gateway: Gateway) -> None:
    missing = httpx.post(f"{gateway.url}/api/chat", json={"messages": []})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})
    bad = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=b"{",
        headers={"Content-Type": "application/json"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    unknown = httpx.get(f"{gateway.url}/api/nothing")
    assert unknown.status_code == 404
    assert "error" in unknown.json()


async def test_burst_of_50_on_two_single_slot_backends_all_accounted() -> None:
    config = with_ports(make_config(num_parallel=1, decode_tps=500, output_tokens=(10, 10)), 2)
    with sim_servers(config) as servers, gateway_for(servers) as gateway:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                body = {"model": CHAT_MODEL, "prompt": f"question {i}", "stream": False}
                async with session.post(f"{gateway.url}/api/generate", json=body) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(one(i) for i in range(50)))
            async with session.get(f"{gateway.url}/parallama/status") as response:
                status: dict[str, Any] = await response.json()
        served = [state(s.url)["outcomes"].get("completed", 0) for s in servers]
    assert statuses == [200] * 50
    assert status["total"] == 50
    assert status["completed"] == 50
    assert status["queue_size"] == status["active"] == 0
    assert sum(served) == 50
    assert min(served) > 0  # both backends did work


async def test_full_queue_is_503_with_retry_after() -> None:
    config = make_config(num_parallel=1, decode_tps=20, output_tokens=(40, 40))
    with sim_servers(config) as servers, gateway_for(servers, max_queue_per_model=1) as gateway:
        async with aiohttp.ClientSession() as session:
            body = {"model": CHAT_MODEL, "prompt": "slow"}
            running = await session.post(f"{gateway.url}/api/generate", json=body)
            queued = asyncio.create_task(session.post(f"{gateway.url}/api/generate", json=body))
            await asyncio.to_thread(wait_for_gateway, gateway.url, lambda s: s["queue_size"] == 1)
            async with session.post(f"{gateway.url}/api/generate", json=body) as refused:
                assert refused.status == 503
                assert int(refused.headers["Retry-After"]) >= 1
                assert "queue is full" in (await refused.json())["error"]
            running.close()
            (await queued).close()


async def test_client_disconnect_mid_stream_frees_the_backend_slot() -> None:
    config = make_config(num_parallel=1, decode_tps=20, output_tokens=(200, 200))
    with sim_servers(config) as servers, gateway_for(servers) as gateway:
        backend = servers[0].url
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{gateway.url}/api/generate", json={"model": CHAT_MODEL, "prompt": "long"}
            )
            await response.content.readline()
            assert model_state(state(backend), CHAT_MODEL)["busy"] == 1
            response.close()
            await asyncio.to_thread(
                wait_for_state, backend, lambda s: model_state(s, CHAT_MODEL)["busy"] == 0
            )
            async with session.get(f"{gateway.url}/parallama/status") as reply:
                status = await reply.json()
    assert status["cancelled"] == 1
    assert status["active"] == 0


async def test_pooled_connections_are_reused() -> None:
    with sim_servers(make_config()) as servers, gateway_for(servers) as gateway:
        async with aiohttp.ClientSession() as session:
            for i in range(20):
                body = {"model": CHAT_MODEL, "prompt": f"q{i}", "stream": False}
                async with session.post(f"{gateway.url}/api/generate", json=body) as response:
                    assert response.status == 200
        accepted = state(servers[0].url)["connections_accepted"] - 1  # minus this test's own
    # One connection for the requests, and at most one more for the gateway's health probe,
    # which may run while a request holds the first.
    assert accepted <= 2


def test_model_lists_are_the_union_over_backends() -> None:
    chat_only = make_config(models=(CHAT_MODEL,))
    embed_only = make_config(models=(EMBED_MODEL,))
    with sim_servers(chat_only) as first, sim_servers(embed_only) as second:
        backends = (
            BackendSettings(url=first[0].url, models=frozenset({CHAT_MODEL})),
            BackendSettings(url=second[0].url, models=frozenset({EMBED_MODEL})),
        )
        with gateway_with(backends) as gateway:
            tags = httpx.get(f"{gateway.url}/api/tags").json()["models"]
            assert sorted(m["name"] for m in tags) == sorted([CHAT_MODEL, EMBED_MODEL])
            listed = httpx.get(f"{gateway.url}/v1/models").json()
            assert listed["object"] == "list"
            assert sorted(m["id"] for m in listed["data"]) == sorted([CHAT_MODEL, EMBED_MODEL])
            ollama.Client(host=gateway.url).embed(model=EMBED_MODEL, input="warm")
            loaded = ollama.Client(host=gateway.url).ps().models
            assert [m.model for m in loaded] == [EMBED_MODEL]
