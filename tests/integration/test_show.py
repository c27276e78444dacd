"""`/api/show` through the gateway: answered while every slot is busy (it runs no generation),
kept by the model's digest, and built for OpenAI-dialect engines from what they tell, so that
the capability and context probes of editors and agents (Zed, Continue, Codex, Open WebUI)
work on llama.cpp and vLLM too."""

from __future__ import annotations

import threading
from dataclasses import replace

import httpx
import ollama

from parallama.config import BackendSettings
from tests.simhelpers import (
    CHAT_MODEL,
    gateway_with,
    make_config,
    sim_servers,
    state,
    wait_for_gateway,
)


def test_show_is_answered_while_the_only_slot_is_generating() -> None:
    config = make_config(decode_tps=20.0, output_tokens=(400, 400))
    with (
        sim_servers(config) as (sim,),
        gateway_with((BackendSettings(url=sim.url, slots=1),)) as gw,
    ):
        streaming, ended = threading.Event(), threading.Event()

        def generate() -> None:
            body = {"model": CHAT_MODEL, "prompt": "write a long story"}
            url = f"{gw.url}/api/generate"
            try:
                with httpx.stream("POST", url, json=body, timeout=60) as answer:
                    for _ in answer.iter_lines():
                        streaming.set()
                ended.set()
            except httpx.HTTPError:  # cut off as the gateway stops, still generating
                pass

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        assert streaming.wait(10)
        shown = httpx.post(f"{gw.url}/api/show", json={"model": CHAT_MODEL}, timeout=10)
        still_generating = not ended.is_set()
        queued = httpx.get(f"{gw.url}/parallama/status").json()["queue_size"]
    assert shown.status_code == 200
    assert shown.json()["model_info"]
    assert still_generating  # it did not wait for the slot
    assert queued == 0


def test_show_is_asked_of_the_backend_once_per_digest() -> None:
    with sim_servers(make_config()) as (sim,), gateway_with((BackendSettings(url=sim.url),)) as gw:
        wait_for_gateway(gw.url, lambda s: s["backends"][0]["installed"])
        before = state(sim.url)["requests_by_route"].get("/api/show", 0)
        answers = [
            httpx.post(f"{gw.url}/api/show", json={"model": CHAT_MODEL}, timeout=10)
            for _ in range(3)
        ]
        asked = state(sim.url)["requests_by_route"]["/api/show"] - before
        missing = httpx.post(f"{gw.url}/api/show", json={"model": "ghost:1b"}, timeout=10)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].content == answers[2].content
    assert asked == 1
    assert missing.status_code == 404
    assert missing.json() == {"error": "model 'ghost:1b' not found"}


def test_show_of_a_model_on_a_llama_server_engine_tells_its_context_and_tools() -> None:
    config = replace(make_config(num_parallel=2), occupancy="slots")
    with sim_servers(config) as (engine,):
        backend = BackendSettings(url=engine.url, kind="openai", slots=2)
        with gateway_with((backend,), health_interval=0.05) as gw:
            wait_for_gateway(gw.url, lambda s: s["backends"][0]["installed"])
            shown = ollama.Client(host=gw.url).show(CHAT_MODEL)
            native = state(engine.url)["requests_by_route"].get("/api/show", 0)
    info = shown.modelinfo or {}
    architecture = info["general.architecture"]
    assert info[f"{architecture}.context_length"] == config.scheduler.default_num_ctx
    assert "tools" in (shown.capabilities or [])
    assert "vision" not in (shown.capabilities or [])
    assert native == 0  # nothing but its OpenAI routes and /props was asked
