"""Pinned options and keep_alive (`[models."name"]`) against the emulator, which reloads a
model, as Ollama does, for a request whose runner options differ from the loaded ones."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from parallama.config import BackendSettings
from tests.simhelpers import (
    CHAT_MODEL,
    OTHER_MODEL,
    burst,
    eventually,
    gateway_with,
    make_config,
    sim_server,
    sim_servers,
    state,
    with_ports,
)


def alternate_num_ctx(url: str) -> list[int]:
    """Two clients taking turns, one with num_ctx 2048, one with 8192."""
    statuses = []
    for n in range(6):
        body = {
            "model": CHAT_MODEL,
            "prompt": "hi",
            "stream": False,
            "options": {"num_ctx": 2048 if n % 2 else 8192},
        }
        statuses.append(httpx.post(f"{url}/api/generate", json=body, timeout=30).status_code)
    return statuses


def test_clients_alternating_num_ctx_reload_the_model_unless_it_is_pinned() -> None:
    pinned: dict[str, Any] = {CHAT_MODEL: {"options": {"num_ctx": 8192}, "keep_alive": "30m"}}
    loads = {}
    for name, models in (("as clients ask", {}), ("pinned", pinned)):
        with (
            sim_server() as sim,
            gateway_with((BackendSettings(url=sim.url),), models=models) as gateway,
        ):
            assert alternate_num_ctx(gateway.url) == [200] * 6
            loads[name] = state(sim.url)["loads"][CHAT_MODEL]
            if models:  # a client's keep_alive 0 does not unload it for the others
                unload = {"model": CHAT_MODEL, "prompt": "", "keep_alive": 0}
                httpx.post(f"{gateway.url}/api/generate", json=unload, timeout=30)
                ps = httpx.get(f"{sim.url}/api/ps").json()["models"]
                assert [m["name"] for m in ps] == [CHAT_MODEL]
    assert loads == {"as clients ask": 6, "pinned": 1}


def test_strict_pins_refuse_a_differing_option_in_ollamas_format() -> None:
    strict: dict[str, Any] = {CHAT_MODEL: {"options": {"num_ctx": 8192}, "strict": True}}
    with (
        sim_server() as sim,
        gateway_with((BackendSettings(url=sim.url),), models=strict) as gateway,
    ):
        refused = httpx.post(
            f"{gateway.url}/api/chat",
            json={"model": CHAT_MODEL, "messages": [], "options": {"num_ctx": 2048}},
        )
        ok = httpx.post(
            f"{gateway.url}/api/generate",
            json={"model": CHAT_MODEL, "prompt": "hi", "stream": False},
            timeout=30,
        )
    assert refused.status_code == 400
    assert refused.json() == {
        "error": f"model '{CHAT_MODEL}' runs with num_ctx = 8192: leave it out or send that"
    }
    assert ok.status_code == 200


def loaded(url: str) -> list[str]:
    return sorted(m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"])


def test_warm_models_are_loaded_before_anyone_asks_and_again_after_an_eviction() -> None:
    config = with_ports(make_config(), 2)
    models: dict[str, Any] = {
        CHAT_MODEL: {"warm": True, "replicas": 1},  # on one of the two
        OTHER_MODEL: {"warm": True},  # on both
    }
    with (
        sim_servers(config) as sims,
        gateway_with(
            tuple(BackendSettings(url=s.url) for s in sims), models=models, health_interval=0.2
        ) as gateway,
    ):
        urls = [s.url for s in sims]
        where = eventually(
            lambda: [loaded(url) for url in urls],
            lambda seen: (
                sum(CHAT_MODEL in s for s in seen) == 1 and all(OTHER_MODEL in s for s in seen)
            ),
        )
        chat_on = urls[[CHAT_MODEL in s for s in where].index(True)]
        status = httpx.get(f"{gateway.url}/parallama/status").json()["warm_models"]
        # Evicted behind the gateway's back (another client, a restart): loaded again.
        unload = {"model": CHAT_MODEL, "prompt": "", "keep_alive": 0}
        httpx.post(f"{chat_on}/api/generate", json=unload, timeout=10)
        reloaded = eventually(
            lambda: sum(state(url)["loads"].get(CHAT_MODEL, 0) for url in urls),
            lambda count: count == 2,  # once at start, once after the eviction
        )
        again = eventually(
            lambda: [loaded(url) for url in urls],
            lambda seen: sum(CHAT_MODEL in s for s in seen) == 1,
        )
    assert status[CHAT_MODEL]["loaded_on"] == [chat_on]
    assert status[CHAT_MODEL]["replicas"] == 1
    assert sorted(status[OTHER_MODEL]["loaded_on"]) == sorted(urls)
    assert reloaded == 2 and sum(CHAT_MODEL in s for s in again) == 1


def test_a_warm_model_is_loaded_with_its_pinned_options_so_no_request_reloads_it() -> None:
    models: dict[str, Any] = {CHAT_MODEL: {"warm": True, "options": {"num_ctx": 8192}}}
    with (
        sim_server() as sim,
        gateway_with((BackendSettings(url=sim.url),), models=models) as gateway,
    ):
        eventually(lambda: loaded(sim.url), lambda names: CHAT_MODEL in names)
        body = {"model": CHAT_MODEL, "prompt": "hi", "stream": False}
        assert httpx.post(f"{gateway.url}/api/generate", json=body, timeout=30).status_code == 200
        count = state(sim.url)["loads"][CHAT_MODEL]
    assert count == 1  # the warm load, and no other


def test_model_affinity_told_the_room_never_evicts_a_warm_model_to_spill() -> None:
    """Engines that keep one model each: the first serves the chat model only, the two others
    keep a warm model and may also serve the chat model. A burst for the chat model waits for
    its engine rather than evict the warm model's copies (which the warmer would load back)."""
    config = with_ports(make_config(max_loaded_models=1, models=(CHAT_MODEL, OTHER_MODEL)), 3)
    with sim_servers(config) as sims:
        chat_only, *others = (s.url for s in sims)
        load = {"model": CHAT_MODEL, "prompt": ""}
        assert httpx.post(f"{chat_only}/api/generate", json=load).status_code == 200
        backends = (
            BackendSettings(url=chat_only, models=frozenset({CHAT_MODEL}), max_loaded_models=1),
            *(BackendSettings(url=url, max_loaded_models=1) for url in others),
        )
        models: dict[str, Any] = {OTHER_MODEL: {"warm": True}}  # on every engine serving it
        with gateway_with(
            backends, models=models, routing="model-affinity", health_interval=0.05
        ) as gateway:
            eventually(
                lambda: [loaded(url) for url in others],
                lambda seen: all(OTHER_MODEL in s for s in seen),
            )
            statuses = asyncio.run(burst(gateway.url, 6))
        unloads = [state(url)["unloads"] for url in others]
    assert statuses == [200] * 6
    assert unloads == [0, 0]
