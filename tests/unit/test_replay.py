"""Traces (what is kept, what is refused), made-up prompts of a traced length, calibrated timing
profiles and their batching curve."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from parallama.bench.calibration import from_report
from parallama.bench.main import BenchError
from parallama.bench.trace import (
    FIXED_TOKENS,
    TracedRequest,
    TraceError,
    from_ledger,
    parse_trace,
    read_trace,
    replay_prompt,
    trace_lines,
)
from parallama.errors import ConfigError
from parallama.sim.answers import chat_prompt
from parallama.sim.profiles import profile_text, read_profile, timing_for
from parallama.sim.timing import TimingModel


def lines(*objects: object) -> list[bytes]:
    return [orjson.dumps(o) for o in objects]


def test_a_trace_is_read_sorted_from_time_zero_and_written_back_the_same() -> None:
    trace = parse_trace(
        [
            *lines(
                {"time": 102.5, "model": "m", "prompt_tokens": 10, "generated_tokens": 1},
                {
                    "time": 100,
                    "model": "m",
                    "prompt_tokens": 300,
                    "generated_tokens": 20,
                    "key": "a",
                },
            ),
            b"  \n",
        ],
        "t.jsonl",
    )
    assert trace == (
        TracedRequest(0.0, "m", 300, 20, "a"),
        TracedRequest(2.5, "m", 10, 1, None),
    )
    assert parse_trace(list(trace_lines(trace)), "again") == trace


def test_a_trace_file_is_read_a_bounded_line_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"x" * 10_000_000)  # no newline anywhere: never read whole
    with pytest.raises(TraceError, match=r"t\.jsonl:1: a line of over 4096 bytes"):
        read_trace(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "t:1: not JSON"),
        (b"[1, 2]", "t:1: expected an object"),
        (b'{"time": -1, "model": "m", "prompt_tokens": 1, "generated_tokens": 1}', '"time"'),
        (b'{"time": true, "model": "m", "prompt_tokens": 1, "generated_tokens": 1}', '"time"'),
        (b'{"time": 1, "model": "", "prompt_tokens": 1, "generated_tokens": 1}', '"model"'),
        (b'{"time": 1, "model": "m", "prompt_tokens": 0, "generated_tokens": 1}', "prompt_tokens"),
        (b'{"time": 1, "model": "m", "prompt_tokens": 5, "generated_tokens": 1.5}', "generated"),
        (b'{"time": 1, "model": "m", "prompt_tokens": 5, "generated_tokens": 0}', "from 1 to"),
        (b'{"time": 1, "model": "m", "prompt_tokens": 5}', "generated_tokens"),
        (b'{"time": 1, "model": "m", "prompt_tokens": 5, "generated_tokens": 1, "key": 7}', "key"),
        (b'{"time": 1, "model": "' + b"m" * 5000 + b'"}', "over 4096 bytes"),
    ],
)
def test_a_bad_line_is_named_with_its_number_and_reason(line: bytes, message: str) -> None:
    with pytest.raises(TraceError, match=message.replace("[", r"\[")):
        parse_trace([line], "t")


def test_an_empty_trace_is_refused() -> None:
    with pytest.raises(TraceError, match="has no requests"):
        parse_trace([b"\n"], "empty.jsonl")


def test_the_ledgers_answered_requests_become_a_trace_from_the_first_arrival() -> None:
    rows: list[dict[str, object]] = [
        {"at": 1000.0, "key_name": "a", "model": "m", "status": 200, "prompt_tokens": 5,
         "generated_tokens": 7},
        {"at": 1003.5, "key_name": None, "model": "m", "status": 200, "prompt_tokens": 9,
         "generated_tokens": 2},
        {"at": 999.0, "key_name": "b", "model": "m", "status": 503, "prompt_tokens": None,
         "generated_tokens": None},
        {"at": 999.5, "key_name": "b", "model": None, "status": 200, "prompt_tokens": 3,
         "generated_tokens": 3},
        {"at": 999.7, "key_name": "b", "model": "nomic-embed-text", "status": 200,
         "prompt_tokens": 3, "generated_tokens": 0},  # an embedding: not chat traffic
    ]  # fmt: skip
    assert from_ledger(rows) == (TracedRequest(0.0, "m", 5, 7, "a"), TracedRequest(3.5, "m", 9, 2))
    assert from_ledger(rows[2:]) == ()


def test_a_ledger_of_more_requests_than_a_trace_holds_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("parallama.bench.trace.MAX_REQUESTS", 2)
    row = {"at": 1.0, "model": "m", "status": 200, "prompt_tokens": 5, "generated_tokens": 7}
    assert len(from_ledger([row, row])) == 2
    with pytest.raises(TraceError, match="over 2 requests: ask for a shorter time"):
        from_ledger([row, row, row])


def test_made_up_prompts_count_as_traced_and_share_no_prefix() -> None:
    for tokens in (FIXED_TOKENS, 50, 333):
        prompt = replay_prompt(17, tokens, salt="ab12")
        _, counted = chat_prompt([{"role": "user", "content": prompt}])
        assert len(counted) == tokens  # on the emulator, where nothing words count FIXED_TOKENS
    first, second = replay_prompt(1, 200, "x"), replay_prompt(2, 200, "x")
    assert first.split()[0] != second.split()[0]
    assert replay_prompt(1, 200, "x") != replay_prompt(1, 200, "y")  # another run
    assert len(replay_prompt(1, 100, fixed=30).split()) == 100 - 30 + 1  # a longer template


def test_a_measured_batching_curve_replaces_the_linear_law_and_goes_on_along_its_last_step() -> (
    None
):
    timing = TimingModel(1000, 50, batch_curve=(1.0, 1.5, 1.8))
    assert [timing.slowdown(b) for b in (1, 2, 3, 4, 6)] == [1.0, 1.5, 1.8, 2.1, 2.7]
    assert timing.aggregate_tps(3) == pytest.approx(3 * 50 / 1.8)
    assert TimingModel(1000, 50, batch_curve=(1.0,)).slowdown(3) == pytest.approx(1 + 2 * 0.6)
    with pytest.raises(ValueError, match="batch_curve"):
        TimingModel(1000, 50, batch_curve=(1.0, 0.0))
    with pytest.raises(ValueError, match="finite"):
        TimingModel(float("nan"), 50)
    # A flag for the linear law's shape replaces the measured curve: every value can be set.
    assert timing.with_overrides(batch_slowdown=0.2).slowdown(3) == pytest.approx(1.4)


def test_the_prefill_offset_and_the_cache_overlap_at_the_prompts_start() -> None:
    timing = TimingModel(1000, 50, prefill_offset=30)
    assert timing.evaluated_tokens(100, cached=0) == 70  # the template, cached from before
    assert timing.evaluated_tokens(100, cached=90) == 10  # a turn's history covers it: once
    assert timing.evaluated_tokens(20, cached=0) == 0
    fixed_cost = TimingModel(1000, 50, prefill_offset=-5)
    assert fixed_cost.evaluated_tokens(100, cached=40) == 65


def test_a_profile_file_round_trips_and_bad_ones_say_why(tmp_path: Path) -> None:
    timing = TimingModel(812.5, 41.25, load_seconds=1.5, batch_curve=(1.0, 1.62))
    path = tmp_path / "gpu.toml"
    path.write_text(profile_text(timing, "calibrated on a test"))
    assert path.read_text().startswith("# parallama timing profile: calibrated on a test\n")
    assert timing_for(str(path)) == timing
    assert timing_for("fast").decode_tps == 500
    knee = TimingModel(100, 10, batch_slowdown=0.2, batch_knee=3)
    path.write_text(profile_text(knee, "a linear law with a knee"))
    assert read_profile(path) == knee
    for text, message in [
        ("decode_tps = 5\n", "prefill_tps and decode_tps are needed"),
        ('prefill_tps = 5\ndecode_tps = "fast"\n', "numbers only"),
        ("prefill_tps = 5\ndecode_tps = 5\nturbo = 1\n", "unknown fields turbo"),
        ("prefill_tps = 5\ndecode_tps = -5\n", "must be positive"),
        ("prefill_tps = [", "not TOML"),
        ("prefill_tps = 5\ndecode_tps = 5\nbatch_curve = 3\n", "batch_curve a list"),
        ("prefill_tps = 5\ndecode_tps = 5\nbatch_knee = inf\n", "cannot convert float infinity"),
        ("prefill_tps = nan\ndecode_tps = 5\n", "finite"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_profile(path)
    with pytest.raises(ConfigError, match=r"one of .*fast.*or a profile file"):
        timing_for("h100")
    with pytest.raises(ConfigError, match="cannot read"):
        timing_for(str(tmp_path / "absent.toml"))


def test_a_profile_from_a_bench_report_at_concurrency_1_and_2(tmp_path: Path) -> None:
    def summary(level: int, speed: float, ttft: float) -> dict[str, object]:
        return {
            "setup": "engine", "level": level, "ok": 10, "prompt_tokens": 1000,
            "request_tokens_per_second": {"p50": speed}, "first_token": {"p50": ttft},
        }  # fmt: skip

    report = {
        "plan": {"mode": "concurrency"},
        "summaries": [summary(2, 40, 0.9), summary(1, 50, 0.52)],
    }
    path = tmp_path / "bench.json"
    path.write_bytes(orjson.dumps(report))
    timing = from_report(path, load_seconds=2)
    # 100 prompt tokens a request took 0.52 s less one token's decode (0.02 s) to the first one
    assert timing.prefill_tps == pytest.approx(200)
    assert timing.decode_tps == 50 and timing.batch_curve == (1.0, 1.25)
    assert timing.load_seconds == 2
    for wrong in (
        {"plan": {"mode": "rate"}, "summaries": []},
        {**report, "summaries": [summary(1, 50, 0.52), summary(2, 40, 0.9), summary(4, 30, 1)]},
        {**report, "summaries": [summary(1, 50, 0.52), {**summary(2, 40, 0.9), "setup": "b"}]},
    ):  # not a bench; a level missing (3 busy is not 4); two engines
        path.write_bytes(orjson.dumps(wrong))
        with pytest.raises(BenchError, match="at --concurrency 1,2"):
            from_report(path, 0)
