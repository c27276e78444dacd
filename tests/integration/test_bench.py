"""`parallama bench` against emulated Ollama servers whose timing is known, over loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from parallama.bench.main import BenchError, bench, plan_from
from parallama.bench.runner import run_http
from parallama.cli import build_parser
from tests.launchhelpers import finished
from tests.simhelpers import CHAT_MODEL, make_config, sim_servers, state


def run_bench(*args: str) -> int:
    return asyncio.run(bench(build_parser().parse_args(["bench", *args])))


def json_report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = orjson.loads(path.read_bytes())
    return report


def test_the_measurements_match_what_the_timing_model_predicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 slots, 20 tokens at 100 tokens/s each, prompt processing and loading near instant:
    every answer takes 0.2 s, so 4 clients get at most 20 answers/s and 400 tokens/s."""
    config = make_config(
        num_parallel=4,
        prefill_tps=1e6,
        decode_tps=100,
        output_tokens=(50, 50),
        models=(CHAT_MODEL,),
    )
    with sim_servers(config) as servers:
        out = tmp_path / "report.json"
        code = run_bench(
            servers[0].url, "--requests", "24", "--concurrency", "4", "--max-tokens", "20",
            "--json", str(out),
        )  # fmt: skip
    assert code == 0
    (summary,) = json_report(out)["summaries"]
    assert (summary["ok"], summary["output_tokens"]) == (24, 24 * 20)
    # The emulator's sleeps are a floor; the client and loopback add a little on top.
    assert 0.2 <= summary["latency"]["p50"] < 0.3
    assert 0.009 < summary["inter_token"]["p50"] < 0.015  # one token every 10 ms
    assert 12 < summary["qps"] <= 20
    assert summary["server_tokens_per_second"]["p50"] == pytest.approx(100, rel=0.02)
    table = capsys.readouterr().out
    assert "| setup | concurrency | requests | errors | P50 latency |" in table


def test_several_targets_are_measured_interleaved_and_compared(tmp_path: Path) -> None:
    slow = make_config(decode_tps=200, output_tokens=(10, 10), models=(CHAT_MODEL,))
    fast = make_config(decode_tps=2000, output_tokens=(10, 10), models=(CHAT_MODEL,))
    with sim_servers(slow) as (a,), sim_servers(fast) as (b,):
        out = tmp_path / "report.json"
        code = run_bench(
            f"slow={a.url}", f"fast={b.url}", "--requests", "8", "--concurrency", "1",
            "--rounds", "4", "--json", str(out),
        )  # fmt: skip
    assert code == 0
    report = json_report(out)
    order = [s["setup"] for s in report["slices"]]
    assert order == ["slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]
    starts = [s["started"] for s in report["slices"]]
    assert starts == sorted(starts)
    assert [s["requests"] for s in report["slices"]] == [2] * 8
    slow_summary, fast_summary = report["summaries"]
    assert fast_summary["latency"]["p50"] < slow_summary["latency"]["p50"]


def test_compare_pooling_opens_one_connection_per_request_only_without_the_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sim_servers(make_config(num_parallel=2)) as (server,):
        code = run_bench(
            server.url, "--compare-pooling", "--requests", "12", "--concurrency", "2",
            "--warmup", "0", "--rounds", "2",
        )  # fmt: skip
        accepted = state(server.url)["connections_accepted"]
    assert code == 0
    # 1 to list the models, 12 without a pool, 2 (one per client) with one, 1 for /_sim/state.
    assert accepted == 1 + 12 + 2 + 1
    table = capsys.readouterr().out
    assert "| new connection per request | 2 | 12 | 0 |" in table
    assert "Ratios to new connection per request" in table


def test_an_open_loop_sweep_with_a_plot(tmp_path: Path) -> None:
    with sim_servers(make_config(num_parallel=4, output_tokens=(5, 5))) as (server,):
        out, picture = tmp_path / "r.json", tmp_path / "sweep.png"
        code = run_bench(
            server.url, "--rate", "20,40", "--arrivals", "constant", "--requests", "10",
            "--json", str(out), "--plot", str(picture),
        )  # fmt: skip
    assert code == 0
    summaries = json_report(out)["summaries"]
    assert [(s["level"], s["ok"]) for s in summaries] == [(20, 10), (40, 10)]
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_errors_are_counted_by_kind_and_can_fail_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sim_servers(make_config()) as (server,):
        code = run_bench(
            server.url, "--model", "absent:1b", "--requests", "3", "--max-error-rate", "0.5"
        )
    assert code == 1
    captured = capsys.readouterr()
    assert "| 3x 404 (100%) |" in captured.out  # by kind, and their share
    assert "error rate 100.0% is above --max-error-rate 50.0%" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["http://127.0.0.1:9"],
            "cannot reach 127.0.0.1:9 (http://127.0.0.1:9): connection refused",
        ),
        (["localhost:11434"], "'localhost:11434' is not an http:// URL"),
        (["http://127.0.0.1:9", "--prompts", "/nonexistent.txt"], "cannot reach"),
        (["a=http://x", "a=http://y"], "two targets have the same label"),
    ],
)
def test_bad_targets_get_a_clear_error_not_a_traceback(args: list[str], message: str) -> None:
    done = finished("bench", *args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_slices_too_small_for_the_concurrency_are_refused() -> None:
    with sim_servers(make_config(ports=2)) as (a, b):
        args = build_parser().parse_args(
            ["bench", a.url, b.url, "--requests", "8", "--rounds", "4", "--concurrency", "4"]
        )
        with pytest.raises(BenchError, match="slices of 2, too few for 4 concurrent clients"):
            asyncio.run(bench(args))


@pytest.mark.parametrize("api", ["ollama", "openai", "anthropic", "responses"])
def test_agent_sessions_grow_their_prompts_turn_by_turn_in_every_api(api: str) -> None:
    """Each turn sends the whole history again: the system prompt and task, then per turn the
    answer and a tool result; the API counts the prompt it was sent."""
    config = make_config(num_parallel=4, prefill_tps=1e6, decode_tps=2000, models=(CHAT_MODEL,))
    with sim_servers(config) as (server,):
        args = build_parser().parse_args(
            ["bench", server.url, "--api", api, "--sessions", "2", "--turns", "3", "--rate", "50",
             "--system-tokens", "400", "--tool-tokens", "100", "--max-tokens", "8"]
        )  # fmt: skip
        result = asyncio.run(run_http(asyncio.run(plan_from(args))))
    samples = result.samples
    assert [s.error for s in samples] == [None] * 6
    prompts = sorted(s.prompt_tokens or 0 for s in samples)
    assert prompts[0] >= 400  # the shared system prompt, on the first turn already
    for earlier, later in zip(prompts[::2], prompts[2::2], strict=False):  # a turn a step up
        assert later >= earlier + 100
    assert all(s.first_token is not None and s.tokens == 8 for s in samples)


def test_agent_sessions_on_several_targets_are_interleaved_in_rounds(tmp_path: Path) -> None:
    with sim_servers(make_config(ports=2, models=(CHAT_MODEL,))) as (a, b):
        out = tmp_path / "report.json"
        code = run_bench(
            f"a={a.url}", f"b={b.url}", "--sessions", "4", "--turns", "2", "--rate", "20",
            "--max-tokens", "4", "--json", str(out),
        )  # fmt: skip
    assert code == 0
    report = json_report(out)
    assert [s["setup"] for s in report["slices"]] == ["a", "b", "b", "a"]
    assert [s["requests"] for s in report["slices"]] == [4] * 4  # 2 sessions of 2 turns each
    assert [s["ok"] for s in report["summaries"]] == [8, 8]
