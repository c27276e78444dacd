"""Pinned options and keep_alive (`[models."name"]`) against the emulator, which reloads a
model, as Ollama does, for a request whose runner options differ from the loaded ones."""

from __future__ import annotations

from typing import Any

import httpx

from parallama.config import BackendSettings
from tests.simhelpers import CHAT_MODEL, gateway_with, sim_server, state


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
