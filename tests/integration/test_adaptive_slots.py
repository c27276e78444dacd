"""`slots = "auto"`: the gateway learns how many requests at once give an engine the most
tokens/s, here an emulated one whose throughput peaks at 3 sequences and falls after."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx

from parallama.config import BackendSettings
from parallama.sim.timing import TimingModel
from tests.simhelpers import CHAT_MODEL, gateway_with, make_config, sim_servers

GENERATE = {"model": CHAT_MODEL, "prompt": "Count.", "stream": False}


def test_learned_slots_settle_near_the_engines_best_and_show_in_status_and_metrics() -> None:
    config = replace(
        make_config(num_parallel=8, output_tokens=(20, 20)),
        timing=TimingModel(
            prefill_tps=50_000, decode_tps=400, batch_slowdown=0.3, load_seconds=0, batch_knee=3
        ),
    )
    with sim_servers(config) as (server,):
        backend = BackendSettings(url=server.url, slots="auto", min_slots=1, max_slots=8)
        with gateway_with((backend,), log_requests=False) as gateway:
            status = httpx.get(f"{gateway.url}/parallama/status").json()["backends"][0]
            assert (status["slots"], status["slots_learned"]) == (1, {"min": 1, "max": 8})

            def ask(_: int) -> int:
                with httpx.Client(timeout=60) as client:
                    return sum(
                        client.post(f"{gateway.url}/api/generate", json=GENERATE).status_code == 200
                        for _ in range(40)
                    )

            with ThreadPoolExecutor(10) as pool:  # always more waiting than the engine's best
                answered = sum(pool.map(ask, range(10)))
            learned = httpx.get(f"{gateway.url}/parallama/status").json()["backends"][0]
            metrics = httpx.get(f"{gateway.url}/metrics").text
    assert answered == 400
    # It went up from 1, and not on to 8: the engine gives less past 3.
    assert 2 <= learned["slots"] <= 4, learned
    assert f'parallama_backend_slots{{backend="{server.url}"}} {float(learned["slots"])}' in metrics
