"""The real coding agents through the gateway, over emulated Ollama servers: Claude Code headless
(`claude -p`) and Codex (`codex exec --oss`), as a team points them at its fleet
(`tests/agenthelpers.py` installs them from npm and keeps them offline)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from parallama.gateway.app import Gateway
from parallama.sim.server import SimServer
from tests.agenthelpers import Ran, agents_folder, run_claude, run_codex
from tests.simhelpers import (
    CHAT_MODEL,
    gateway_for,
    gateway_status,
    make_config,
    sim_servers,
    state,
    wait_for_gateway,
)


@pytest.fixture(scope="module")
def agents() -> Path:
    return agents_folder()


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Gateway, list[SimServer]]]:
    config = make_config(ports=2, num_parallel=2, prefill_tps=200_000.0, output_tokens=(10, 20))
    with sim_servers(config) as servers, gateway_for(servers, health_interval=0.05) as gateway:
        wait_for_gateway(gateway.url, lambda s: all(b["installed"] for b in s["backends"]))
        yield gateway, servers


def routes_asked(servers: list[SimServer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for server in servers:
        for route, n in state(server.url)["requests_by_route"].items():
            counts[route] = counts.get(route, 0) + n
    return counts


def test_claude_code_gets_an_answer_through_the_gateway(
    agents: Path, fleet: tuple[Gateway, list[SimServer]], tmp_path: Path
) -> None:
    gateway, servers = fleet
    before = routes_asked(servers).get("/v1/messages", 0)
    ran = run_claude(agents, tmp_path, gateway.url, "Say hello", CHAT_MODEL)
    assert ran.status == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip()
    assert routes_asked(servers)["/v1/messages"] > before


def test_codex_gets_an_answer_through_the_gateway(
    agents: Path, fleet: tuple[Gateway, list[SimServer]], tmp_path: Path
) -> None:
    """Codex checks the Ollama version (0.13.4 or newer), lists the models, then streams
    `/v1/responses`; the emulated model calls one of its tools first, which Codex runs in its
    sandbox and answers, so this is a function-call round trip too."""
    gateway, servers = fleet
    before = routes_asked(servers).get("/v1/responses", 0)
    ran = run_codex(agents, tmp_path, gateway.url, "Say hello", CHAT_MODEL)
    assert ran.status == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip()
    assert routes_asked(servers)["/v1/responses"] >= before + 2


def test_eight_claude_code_sessions_on_two_one_slot_backends_all_finish(
    agents: Path, tmp_path: Path
) -> None:
    """More sessions than slots: they wait in the gateway's queue, which the status shows,
    and every one gets its answer."""
    config = make_config(ports=2, decode_tps=40.0, output_tokens=(24, 24))
    with sim_servers(config) as servers, gateway_for(servers, health_interval=0.05) as gateway:
        wait_for_gateway(gateway.url, lambda s: all(b["installed"] for b in s["backends"]))
        results: list[Ran] = []
        lock = threading.Lock()

        def one(n: int) -> None:
            ran = run_claude(agents, tmp_path / f"s{n}", gateway.url, f"Task {n}", CHAT_MODEL)
            with lock:
                results.append(ran)

        sessions = [threading.Thread(target=one, args=(n,)) for n in range(8)]
        for session in sessions:
            session.start()
        seen = wait_for_gateway(gateway.url, lambda s: s["queued"] > 0, timeout=120)
        for session in sessions:
            session.join(200)
        status = gateway_status(gateway.url)
    assert seen["in_flight"] == 2  # both slots busy while the rest waited
    assert len(results) == 8
    assert all(r.status == 0 and r.stdout.strip() for r in results), [r.stderr for r in results]
    assert status["completed"] >= 8
    assert status["failed"] == status["rejected"] == 0
