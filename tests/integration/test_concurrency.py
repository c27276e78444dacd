"""Ollama's concurrency semantics, observed over real sockets the way a user would see them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from parallama.protocol.ollama import SERVER_BUSY
from tests.simhelpers import CHAT_MODEL, OTHER_MODEL, model_state, sim_server, state, wait_for_state


@dataclass
class Timed:
    status: int
    sent: float
    first_chunk: float
    last_chunk: float
    final: dict[str, Any]


async def timed_generate(session: aiohttp.ClientSession, url: str, **body: Any) -> Timed:
    """Stream one /api/generate and note when its first and last chunks arrived."""
    payload = {"model": CHAT_MODEL, "prompt": "Count slowly.", **body}
    sent = time.monotonic()
    async with session.post(f"{url}/api/generate", json=payload) as response:
        if response.status != 200:
            return Timed(response.status, sent, 0, 0, await response.json(content_type=None))
        first = last = 0.0
        final: dict[str, Any] = {}
        async for line in response.content:
            now = time.monotonic()
            first = first or now
            last = now
            final = orjson.loads(line)
    return Timed(200, sent, first, last, final)


async def test_one_slot_serializes_two_requests() -> None:
    with sim_server(num_parallel=1, decode_tps=50, output_tokens=(20, 20)) as server:
        async with aiohttp.ClientSession() as session:
            a, b = await asyncio.gather(
                timed_generate(session, server.url), timed_generate(session, server.url)
            )
    earlier, later = sorted((a, b), key=lambda t: t.first_chunk)
    # The second request's first token comes only after the first request finished...
    assert later.first_chunk >= earlier.last_chunk
    # ...so its latency is the first's generation plus its own: it waited the first one out.
    own = later.final["eval_duration"] / 1e9
    waited = later.final["total_duration"] / 1e9 - own
    assert waited >= 0.8 * earlier.final["eval_duration"] / 1e9
    assert later.last_chunk - later.sent >= own + waited * 0.99


async def test_two_slots_overlap_two_requests() -> None:
    with sim_server(num_parallel=2, decode_tps=50, output_tokens=(20, 20)) as server:
        async with aiohttp.ClientSession() as session:
            a, b = await asyncio.gather(
                timed_generate(session, server.url), timed_generate(session, server.url)
            )
    earlier, later = sorted((a, b), key=lambda t: t.first_chunk)
    assert later.first_chunk < earlier.last_chunk  # both were generating at once
    waited = later.final["total_duration"] - later.final["eval_duration"]
    assert waited < 0.5 * earlier.final["eval_duration"]


async def test_batching_slows_each_sequence() -> None:
    """With slowdown k, two sequences sharing a model each decode 1+k times slower."""
    with sim_server(
        num_parallel=2, decode_tps=100, batch_slowdown=1.0, output_tokens=(20, 20)
    ) as server:
        async with aiohttp.ClientSession() as session:
            alone = await timed_generate(session, server.url)
            a, b = await asyncio.gather(
                timed_generate(session, server.url), timed_generate(session, server.url)
            )
    shared = min(a.final["eval_duration"], b.final["eval_duration"])
    assert shared > 1.3 * alone.final["eval_duration"]


async def test_cold_burst_overflows_the_pending_queue_with_503() -> None:
    """While a model loads, later requests wait in the bounded pending queue; the rest get 503."""
    with sim_server(max_queue=2, load_seconds=1.5) as server:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(timed_generate(session, server.url))
            await asyncio.to_thread(
                wait_for_state,
                server.url,
                lambda s: model_state(s, CHAT_MODEL)["state"] == "loading",
            )
            burst = await asyncio.gather(*(timed_generate(session, server.url) for _ in range(4)))
            results = [await first, *burst]
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 200, 200, 503, 503]
    rejected = [r.final for r in results if r.status == 503]
    assert rejected == [{"error": SERVER_BUSY}] * 2


async def test_warm_burst_queues_without_limit() -> None:
    """Requests for a loaded model wait on its slots, which Ollama does not bound (#7758)."""
    with sim_server(max_queue=2, num_parallel=1) as server:
        async with aiohttp.ClientSession() as session:
            await timed_generate(session, server.url)  # load the model
            results = await asyncio.gather(
                *(timed_generate(session, server.url) for _ in range(10))
            )
    assert [r.status for r in results] == [200] * 10


async def test_disconnect_while_generating_frees_the_slot() -> None:
    with sim_server(num_parallel=1, decode_tps=20, output_tokens=(200, 200)) as server:
        async with aiohttp.ClientSession() as session:
            payload = {"model": CHAT_MODEL, "prompt": "A long answer, please."}
            response = await session.post(f"{server.url}/api/generate", json=payload)
            await response.content.readline()  # generating now
            assert model_state(await asyncio.to_thread(state, server.url), CHAT_MODEL)["busy"] == 1
            response.close()  # the client goes away
            after = await asyncio.to_thread(
                wait_for_state, server.url, lambda s: model_state(s, CHAT_MODEL)["busy"] == 0
            )
            assert after["outcomes"].get("cancelled") == 1
            quick = await timed_generate(session, server.url, options={"num_predict": 2})
    assert quick.status == 200
    assert quick.final["eval_count"] == 2


async def test_disconnect_while_queued_drops_the_request() -> None:
    with sim_server(num_parallel=1, decode_tps=20, output_tokens=(200, 200)) as server:
        async with aiohttp.ClientSession() as session:
            body = {"model": CHAT_MODEL, "prompt": "A long answer, please."}
            running = await session.post(f"{server.url}/api/generate", json=body)
            await running.content.readline()
            queued = asyncio.create_task(session.post(f"{server.url}/api/generate", json=body))
            await asyncio.to_thread(
                wait_for_state, server.url, lambda s: model_state(s, CHAT_MODEL)["waiting"] == 1
            )
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            after = await asyncio.to_thread(
                wait_for_state, server.url, lambda s: model_state(s, CHAT_MODEL)["waiting"] == 0
            )
            assert model_state(after, CHAT_MODEL)["busy"] == 1
            running.close()


async def test_keep_alive_connections_are_reused() -> None:
    with sim_server() as server:
        before = state(server.url)["connections_accepted"]
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                async with session.get(f"{server.url}/api/version") as response:
                    assert response.status == 200
        after = state(server.url)["connections_accepted"]  # this probe is one more connection
        assert after - before == 1 + 1


async def post(
    session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with session.post(f"{url}{path}", json=body) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json(content_type=None)
        return result


async def ps_names(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/api/ps") as response:
        return [m["name"] for m in (await response.json())["models"]]


async def test_max_loaded_models_evicts_an_idle_model() -> None:
    with sim_server(max_loaded_models=1) as server:
        async with aiohttp.ClientSession() as session:
            await post(
                session,
                server.url,
                "/api/generate",
                {"model": CHAT_MODEL, "prompt": "a", "stream": False},
            )
            assert await ps_names(session, server.url) == [CHAT_MODEL]
            await post(
                session,
                server.url,
                "/api/generate",
                {"model": OTHER_MODEL, "prompt": "b", "stream": False},
            )
            assert await ps_names(session, server.url) == [OTHER_MODEL]
        assert state(server.url)["unloads"] == 1


@pytest.mark.parametrize(("policy", "survivor"), [("ollama", CHAT_MODEL), ("lru", OTHER_MODEL)])
async def test_which_model_is_evicted(policy: str, survivor: str) -> None:
    """Ollama unloads the shortest keep-alive first; `lru` the least recently used."""
    third = "llama3.1:8b"
    with sim_server(
        max_loaded_models=2, eviction=policy, models=(CHAT_MODEL, OTHER_MODEL, third)
    ) as server:
        async with aiohttp.ClientSession() as session:
            generate = "/api/generate"
            await post(
                session,
                server.url,
                generate,
                {"model": CHAT_MODEL, "prompt": "a", "stream": False, "keep_alive": "1h"},
            )
            await post(
                session,
                server.url,
                generate,
                {"model": OTHER_MODEL, "prompt": "b", "stream": False, "keep_alive": "10m"},
            )
            await post(
                session, server.url, generate, {"model": third, "prompt": "c", "stream": False}
            )
            assert sorted(await ps_names(session, server.url)) == sorted([survivor, third])


async def test_keep_alive_zero_unloads_after_the_answer() -> None:
    with sim_server() as server:
        async with aiohttp.ClientSession() as session:
            await post(
                session,
                server.url,
                "/api/chat",
                {
                    "model": CHAT_MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": False,
                    "keep_alive": 0,
                },
            )
            assert await ps_names(session, server.url) == []


async def test_preload_and_unload_with_an_empty_prompt() -> None:
    with sim_server() as server:
        async with aiohttp.ClientSession() as session:
            loaded = await post(session, server.url, "/api/generate", {"model": CHAT_MODEL})
            assert (loaded["done"], loaded["done_reason"], loaded["response"]) == (True, "load", "")
            assert await ps_names(session, server.url) == [CHAT_MODEL]
            unloaded = await post(
                session, server.url, "/api/generate", {"model": CHAT_MODEL, "keep_alive": 0}
            )
            assert unloaded["done_reason"] == "unload"
            assert await ps_names(session, server.url) == []


async def test_ps_shows_expiry_from_keep_alive() -> None:
    with sim_server() as server:
        async with aiohttp.ClientSession() as session:
            await post(
                session, server.url, "/api/generate", {"model": CHAT_MODEL, "keep_alive": "10m"}
            )
            await post(
                session, server.url, "/api/generate", {"model": OTHER_MODEL, "keep_alive": -1}
            )
            async with session.get(f"{server.url}/api/ps") as response:
                rows = (await response.json())["models"]
    assert [r["name"] for r in rows] == [OTHER_MODEL, CHAT_MODEL]  # latest expiry first
    forever, ten_minutes = (r["expires_at"] for r in rows)
    assert int(forever[:4]) > 2200
    from datetime import datetime

    expires = datetime.fromisoformat(ten_minutes).timestamp()
    assert 590 < expires - time.time() <= 600


async def test_a_conversations_next_turn_reuses_its_slots_prompt_cache() -> None:
    """Each slot keeps its last sequence (prompt and answer): the next turn, which sends the
    answer back, has all of it cached but the new message; a stranger's prompt has none."""
    system = {"role": "system", "content": "You answer in the house style. " * 60}
    chat = [system, {"role": "user", "content": "Why is the sky blue?"}]
    with sim_server(num_parallel=2, prefill_tps=20_000) as server:
        async with aiohttp.ClientSession() as session:

            async def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
                body = {"model": CHAT_MODEL, "messages": messages, "stream": False}
                async with session.post(f"{server.url}/api/chat", json=body) as response:
                    answer: dict[str, Any] = await response.json()
                    return answer

            first = await ask(chat)
            second = await ask([*chat, first["message"], {"role": "user", "content": "Why?"}])
            counted = state(server.url)
    asked = first["prompt_eval_count"] + second["prompt_eval_count"]
    assert counted["prompt_tokens"][CHAT_MODEL] == asked  # prompt_eval_count: all of it
    cached = counted["cached_tokens"][CHAT_MODEL]
    # All of the first exchange, as the second turn sends it back, was in the cache.
    new_part = len(["<|end|>", "<|start|>", "user", "\n", "Why", "?", "<|end|>"]) + 3
    assert cached == second["prompt_eval_count"] - new_part
