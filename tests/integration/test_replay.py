"""Traffic replay and calibrated profiles: `parallama plan --calibrate` on an emulator whose speeds
are known, `plan --replay` on a virtual clock against `bench --replay` of the same trace through
the gateway in real time, and the errors of both."""

from __future__ import annotations

import random
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from parallama.bench.trace import TracedRequest, trace_lines
from parallama.sim.profiles import profile_text
from parallama.sim.timing import TimingModel
from tests.launchhelpers import finished
from tests.simhelpers import CHAT_MODEL, gateway_for, make_config, sim_servers

# The emulator's speeds, as a profile file would give them to the planner.
TIMING = TimingModel(prefill_tps=2000, decode_tps=100, batch_slowdown=0.5, load_seconds=0)


def write_trace(path: Path, requests: int, rate: float, seed: int = 5) -> list[TracedRequest]:
    choose, time, trace = random.Random(seed), 0.0, []
    for n in range(requests):
        time += choose.expovariate(rate)
        key = "alice" if n % 3 else None
        trace.append(
            TracedRequest(time, CHAT_MODEL, choose.randint(30, 400), choose.randint(5, 40), key)
        )
    path.write_bytes(b"".join(trace_lines(trace)))
    return trace


def run(*args: str) -> subprocess.CompletedProcess[str]:
    done = finished(*args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def summaries(path: Path) -> list[dict[str, Any]]:
    report: dict[str, Any] = orjson.loads(path.read_bytes())
    return list(report["summaries"])


def test_a_trace_replayed_on_the_virtual_clock_agrees_with_it_replayed_for_real(
    tmp_path: Path,
) -> None:
    trace_file, profile = tmp_path / "trace.jsonl", tmp_path / "emulated.toml"
    trace = write_trace(trace_file, requests=40, rate=8)
    profile.write_text(profile_text(TIMING, "the emulator's own speeds"))
    planned = tmp_path / "plan.json"
    plan_args = ("plan", "--replay", str(trace_file), "--profile", str(profile))
    run(*plan_args, "--instances", "2", "--num-parallel", "2", "--json", str(planned))
    again = tmp_path / "again.json"
    run(*plan_args, "--instances", "2", "--num-parallel", "2", "--json", str(again))
    assert summaries(planned) == summaries(again)  # the same trace, the same numbers
    (predicted,) = summaries(planned)
    config = make_config(
        num_parallel=2,
        prefill_tps=TIMING.prefill_tps,
        decode_tps=TIMING.decode_tps,
        batch_slowdown=TIMING.batch_slowdown,
        output_tokens=(1000, 1000),  # num_predict cuts each answer at its traced length
        models=(CHAT_MODEL,),
        ports=2,
    )
    measured_file = tmp_path / "run.json"
    with sim_servers(config) as servers, gateway_for(servers, slots=2) as gateway:
        run("bench", gateway.url, "--replay", str(trace_file), "--json", str(measured_file))
    (measured,) = summaries(measured_file)
    assert predicted["ok"] == measured["ok"] == 40
    assert measured["output_tokens"] == sum(t.generated_tokens for t in trace)
    assert measured["prompt_tokens"] == predicted["prompt_tokens"]  # as long as traced
    assert measured["prompt_tokens"] == sum(t.prompt_tokens for t in trace)
    assert measured["queue_wait"]["p50"] is not None  # read from the gateway's header
    for figure in ("qps",):
        assert predicted[figure] == pytest.approx(measured[figure], rel=0.15)
    assert predicted["latency"]["p50"] == pytest.approx(measured["latency"]["p50"], rel=0.15)


def test_plan_replay_names_the_cheapest_fleet_that_meets_the_target(tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.jsonl"
    write_trace(trace_file, requests=60, rate=3)
    profile = tmp_path / "emulated.toml"
    profile.write_text(profile_text(TIMING, "the emulator's own speeds"))
    out = tmp_path / "plan.json"
    done = run(
        "plan", "--replay", str(trace_file), "--profile", str(profile),
        "--instances", "1,2", "--num-parallel", "1,2", "--routing", "least-loaded,round-robin",
        "--target-p99", "1.5", "--json", str(out),
    )  # fmt: skip
    report = orjson.loads(out.read_bytes())
    rows = {s["setup"]: s for s in report["summaries"]}
    assert len(rows) == 8
    assert "| 1 x emulated, 1 slot, least-loaded | 1x | 60 |" in done.stdout
    cheapest = report["needed"]["setup"]
    assert f"The cheapest fleet with p99 under 1.5 s and nothing refused: {cheapest}" in done.stdout
    assert rows[cheapest]["latency"]["p99"] <= 1.5 and not rows[cheapest]["errors"]
    order = list(rows)  # cheapest first
    assert all(rows[s]["latency"]["p99"] > 1.5 for s in order[: order.index(cheapest)])
    assert rows["1 x emulated, 1 slot, least-loaded"]["latency"]["p99"] > 1.5  # one is too few


def test_plan_replay_compares_warm_models_against_engines_that_load_on_demand(
    tmp_path: Path,
) -> None:
    trace_file, out = tmp_path / "trace.jsonl", tmp_path / "plan.json"
    write_trace(trace_file, requests=60, rate=2)
    run(
        "plan", "--replay", str(trace_file), "--profile", "fast", "--instances", "2",
        "--load-seconds", "3", "--warm", "both", "--json", str(out),
    )  # fmt: skip
    cold, warm = summaries(out)
    assert (cold["setup"], warm["setup"]) == (
        "2 x fast, 1 slot, least-loaded",
        "2 x fast, 1 slot, least-loaded, warm",
    )
    assert cold["first_token"]["p99"] > 3  # a first request on an engine waits for its load
    assert warm["first_token"]["p99"] < 1  # loaded before the first request, and kept


def test_calibrating_a_gateway_measures_each_engine_behind_it(tmp_path: Path) -> None:
    """Two emulated engines of known, different speeds behind a gateway: a profile each."""
    fast, slow = (
        make_config(
            num_parallel=2, prefill_tps=1500, decode_tps=tps, batch_slowdown=0.5, load_seconds=load
        )
        for tps, load in ((80, 0.3), (40, 0.6))
    )
    out = tmp_path / "profile.toml"
    with sim_servers(fast) as fast_servers, sim_servers(slow) as slow_servers:
        engines = [*fast_servers, *slow_servers]
        with gateway_for(engines, slots=2) as gateway:
            done = run(
                "plan", "--calibrate", gateway.url, "--num-parallel", "1,2", "--out", str(out)
            )
        direct = tmp_path / "direct.toml"  # an engine alone: its load time is measured too
        run("plan", "--calibrate", engines[1].url, "--out", str(direct))
    assert "Behind a gateway the load time is not measured" in done.stdout
    assert tomllib.loads(direct.read_text())["load_seconds"] == pytest.approx(0.6, rel=0.2)
    for n, (engine, decode_tps) in enumerate(zip(engines, (80, 40), strict=True), 1):
        written = tmp_path / f"profile-{n}.toml"
        assert f"Written to {written}" in done.stdout
        text = written.read_text()
        assert f"calibrated on {engine.url} ({CHAT_MODEL})" in text  # the first it lists
        profile = tomllib.loads(text)
        assert profile["prefill_tps"] == pytest.approx(1500, rel=0.2)
        assert profile["decode_tps"] == pytest.approx(decode_tps, rel=0.1)
        assert profile["batch_curve"][0] == 1.0
        assert profile["batch_curve"][1] == pytest.approx(1.5, rel=0.15)  # two at once: 1 + 0.5
        assert profile["load_seconds"] == 0  # engines serving traffic are not unloaded
    first = tmp_path / "profile-1.toml"
    planned = run("plan", "--profile", str(first), "--instances", "1", "--requests", "10")
    assert "| 1 x profile-1 | 8 | 10 | 0 |" in planned.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--replay", "/nonexistent.jsonl"], "cannot read /nonexistent.jsonl"),
        (["plan", "--replay", "TRACE", "--rate", "2"], "--replay sets the arrivals"),
        (["plan", "--replay", "TRACE", "--speed", "0"], "--speed must be positive"),
        (["plan", "--replay", "TRACE", "--speed", "nan"], "--speed must be positive"),
        (["plan", "--replay", "TRACE", "--load-seconds", "-1"], "a number of seconds from 0"),
        (["plan", "--instances", "nan"], "give positive numbers"),
        (["plan", "--replay", "TRACE", "--routing", "prefix-affinity"], "keeps no prompt"),
        (
            ["plan", "--replay", "TRACE", "--profile", "CURVE", "--num-parallel", "1,4"],
            "measured with up to 2 at once: calibrate with --num-parallel 4",
        ),
        (["bench", "http://127.0.0.1:9", "--replay", "TRACE", "--prompts", "x.txt"], "--prompts"),
        (["plan", "--profile", "h100"], "or a profile file (.toml)"),
        (["plan", "--routing", "fastest"], "policies are least-loaded"),
        (["plan", "--num-parallel", "1,2"], "are candidates for --replay"),
        (["plan", "--replay", "TRACE", "--max-loaded-models", "0"], "positive whole numbers"),
        (["plan", "--calibrate", "http://127.0.0.1:9"], "did not answer"),
        (["bench", "http://127.0.0.1:9", "--replay", "TRACE"], "did not answer"),
        (["bench", "http://127.0.0.1:9", "--replay", "/nonexistent.jsonl"], "cannot read"),
    ],
)
def test_bad_replays_and_calibrations_get_a_clear_error(
    args: list[str], message: str, tmp_path: Path
) -> None:
    trace, curve = tmp_path / "trace.jsonl", tmp_path / "curve.toml"
    write_trace(trace, requests=3, rate=1)
    curve.write_text(profile_text(replace(TIMING, batch_curve=(1.0, 1.4)), "two at most"))
    files = {"TRACE": str(trace), "CURVE": str(curve)}
    done = finished(*(files.get(a, a) for a in args))
    assert done.returncode == 2, done.stdout
    assert message in done.stderr
    assert "Traceback" not in done.stderr
