"""`parallama plan`: the simulation on a virtual clock against the same workload run for real
(the gateway in front of emulated servers, over loopback, in real time)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from parallama.bench.runner import Plan, Setup, run_http
from parallama.bench.simulate import simulate
from parallama.bench.workload import Workload
from tests.launchhelpers import finished
from tests.simhelpers import CHAT_MODEL, gateway_for, make_config, sim_servers, state


def test_the_simulation_agrees_with_a_real_time_run_on_the_emulator() -> None:
    """2 emulated servers with 2 slots each, batching slowdown, 6 clients: the gateway queues,
    binds late and the slots slow each other down, in both runs."""
    config = make_config(
        num_parallel=2,
        prefill_tps=2000,
        decode_tps=100,
        batch_slowdown=0.3,
        output_tokens=(30, 60),
        models=(CHAT_MODEL,),
        ports=2,
    )
    workload = Workload("ollama", "chat", CHAT_MODEL)
    plan = Plan(
        setups=(Setup("2 servers", "sim://2"),),
        workload=workload,
        mode="concurrency",
        levels=(6,),
        requests=36,
    )
    started = time.perf_counter()
    simulated = simulate(plan, config, {"2 servers": 2}).summaries()[0]
    simulated_in = time.perf_counter() - started
    with sim_servers(config) as servers, gateway_for(servers, slots=2) as gateway:
        real_plan = replace(plan, setups=(Setup("2 servers", gateway.url),))
        real = asyncio.run(run_http(real_plan)).summaries()[0]
    assert simulated.ok == real.ok == 36
    assert simulated.output_tokens == real.output_tokens  # the same answers, token for token
    assert simulated.qps == pytest.approx(real.qps, rel=0.10)
    assert simulated.latency["p50"] == pytest.approx(real.latency["p50"], rel=0.10)
    assert simulated_in < real.seconds  # no waiting: virtual time


def test_the_simulation_fails_over_from_a_busy_server_as_the_gateway_does() -> None:
    """Cold servers with room for one request waiting to load (OLLAMA_MAX_QUEUE=1) answer the
    rest "server busy": the gateway halves their slots and moves each refused request to the
    other server. The simulation must do the same, not count 503s the gateway never gave."""
    config = make_config(
        num_parallel=4,
        max_queue=1,
        load_seconds=0.3,
        prefill_tps=2000,
        decode_tps=200,
        output_tokens=(20, 40),
        models=(CHAT_MODEL,),
        ports=2,
    )
    plan = Plan(
        setups=(Setup("2 servers", "sim://2"),),
        workload=Workload("ollama", "chat", CHAT_MODEL),
        mode="concurrency",
        levels=(8,),
        requests=16,
        warmup=0,
    )
    simulated = simulate(plan, config, {"2 servers": 2}).summaries()[0]
    with sim_servers(config) as servers, gateway_for(servers, slots=4) as gateway:
        real_plan = replace(plan, setups=(Setup("2 servers", gateway.url),))
        real = asyncio.run(run_http(real_plan)).summaries()[0]
        busy = sum(state(s.url)["outcomes"].get("rejected_busy", 0) for s in servers)
    assert busy > 0  # the servers did say "server busy"
    # Within one request (the burst's exact order differs): without failover the simulation
    # completed 4 of 16 where the gateway completed all 16.
    assert simulated.ok == pytest.approx(real.ok, abs=1)
    assert sum(simulated.errors.values()) == pytest.approx(sum(real.errors.values()), abs=1)


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return finished("plan", *args, timeout=120)


def test_plan_compares_fleets_and_finds_the_fewest_instances_for_a_goal(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = plan(
        "--profile", "rtx4090", "--num-parallel", "4", "--instances", "1,2", "--requests", "100",
        "--target-qps", "1", "--target-p99", "20", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| 1 x rtx4090 | 8 | 100 | 0 |" in done.stdout
    assert "| 2 x rtx4090 | 8 | 100 | 0 |" in done.stdout
    report = orjson.loads(out.read_bytes())
    one, two = report["summaries"]
    assert two["qps"] == pytest.approx(2 * one["qps"], rel=0.05)  # two servers, twice the work
    needed = report["needed"]
    assert needed["summary"]["errors"] == {}
    assert needed["summary"]["latency"]["p99"] <= 20
    n = needed["instances"]
    assert f"1 requests/s with p99 under 20 s: {n} instance" in done.stdout
    assert n > 1  # one server at 4 slots cannot keep 1 request/s under 20 s here
    fewer_out = tmp_path / "fewer.json"
    fewer = plan(
        "--profile", "rtx4090", "--num-parallel", "4", "--instances", str(n - 1),
        "--requests", "100", "--rate", "1", "--json", str(fewer_out),
    )  # fmt: skip
    assert fewer.returncode == 0, fewer.stderr
    (short,) = orjson.loads(fewer_out.read_bytes())["summaries"]
    assert short["errors"] or short["latency"]["p99"] > 20  # one fewer would not do


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-qps", "3"], "--target-qps and --target-p99 go together"),
        (["--output-tokens", "9-3"], "need 1 <= MIN <= MAX"),
        (["--instances", "1.5"], "positive whole numbers"),
        (["--prompts", "/nonexistent.txt"], "cannot read /nonexistent.txt"),
    ],
)
def test_bad_plans_get_a_clear_error(args: list[str], message: str) -> None:
    done = plan(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_json_on_standard_output_is_json_alone() -> None:
    done = plan("--instances", "1", "--requests", "20", "--json", "-")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["summaries"][0]["requests"] == 20
    assert "| setup |" in done.stderr  # the table, for the person watching
