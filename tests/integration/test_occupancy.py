"""Real occupancy: an engine that another client uses directly has fewer free slots than the
gateway's own count says, and the gateway reads how busy it is (llama.cpp server's /slots,
vLLM's /metrics; here the emulator telling it the same way) and sends its work elsewhere."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal

import httpx
import pytest

from parallama.config import BackendSettings
from parallama.gateway.fleet.probes import ENGINE_ROUTES
from tests.simhelpers import (
    CHAT_MODEL,
    gateway_with,
    make_config,
    sim_servers,
    state,
    wait_for_gateway,
)

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("source", ["slots", "vllm"])
def test_slots_taken_by_a_direct_client_are_left_alone(source: Literal["slots", "vllm"]) -> None:
    # Answers of about 1.5 s: the direct client's two requests hold both of A's slots.
    slow = make_config(num_parallel=2, decode_tps=20, output_tokens=(30, 30))
    fast = make_config(num_parallel=2)
    with (
        sim_servers(replace(slow, occupancy=source)) as (used,),
        sim_servers(fast) as (other,),
    ):
        backends = tuple(BackendSettings(url=s.url, kind="openai", slots=2) for s in (used, other))
        with gateway_with(backends, occupancy_interval=0.05, health_interval=0.2) as gateway:
            direct: list[int] = []

            def outside() -> None:
                body = {**CHAT, "max_tokens": 30}
                reply = httpx.post(f"{used.url}/v1/chat/completions", json=body, timeout=30)
                direct.append(reply.status_code)

            others = [threading.Thread(target=outside) for _ in range(2)]
            for thread in others:
                thread.start()
            status = wait_for_gateway(
                gateway.url, lambda s: s["backends"][0]["outside"] == 2, timeout=10
            )
            assert status["backends"][0]["active"] == 0
            metrics = httpx.get(f"{gateway.url}/metrics").text
            gauge = f'parallama_backend_outside_requests{{backend="{used.url}"}} 2.0'
            assert gauge in metrics
            # Four at once: by its own count the gateway would give each backend two.
            with ThreadPoolExecutor(4) as pool:
                answers = list(
                    pool.map(
                        lambda _: httpx.post(
                            f"{gateway.url}/api/chat", json={**CHAT, "stream": False}, timeout=30
                        ),
                        range(4),
                    )
                )
            for thread in others:
                thread.join(30)
            sent: dict[str, Any] = state(used.url)["requests_by_route"]
    assert [a.status_code for a in answers] == [200] * 4
    assert direct == [200, 200]
    # The direct client's, and none of ours but the probes' one look at each route it may lack.
    assert sent == {"/v1/chat/completions": 2, **dict.fromkeys(ENGINE_ROUTES, 1)}


def test_ollama_is_asked_nothing_of_the_kind() -> None:
    with sim_servers(replace(make_config(), occupancy="slots")) as (server,):
        backends = (BackendSettings(url=server.url),)
        with gateway_with(backends, occupancy_interval=0.05) as gateway:
            reply = httpx.post(f"{gateway.url}/api/chat", json={**CHAT, "stream": False})
            assert reply.status_code == 200
            assert (
                httpx.get(f"{gateway.url}/parallama/status").json()["backends"][0]["outside"] == 0
            )
