"""The load generator's arithmetic and wire formats, on hand-computed fixtures (sans-I/O)."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import orjson
import pytest

from parallama.bench.main import setups
from parallama.bench.report import as_json, markdown
from parallama.bench.runner import Plan, Result, Setup, Slice, arrival_gaps, round_shares
from parallama.bench.stats import Sample, percentile, summarize
from parallama.bench.workload import AnswerReader, PromptError, Workload, load_prompts

# -- statistics --------------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks_as_numpy_does() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]  # already in order: ranks 0..4
    assert percentile(values, 0.5) == 35.0
    assert percentile(values, 0.4) == 29.0  # rank 1.6: 20 + 0.6 * (35 - 20)
    assert percentile(values, 0.99) == pytest.approx(49.6)  # rank 3.96
    assert percentile(values[::-1], 0.0) == 15.0  # order does not matter
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def sample(latency: float, **fields: object) -> Sample:
    s = Sample("a", 4, 0.0, latency=latency)
    for name, value in fields.items():
        setattr(s, name, value)
    return s


def test_a_summary_counts_completed_work_over_the_setups_own_time() -> None:
    samples = [
        sample(1.0, first_token=0.2, token_times=[0.2, 0.4, 0.6, 1.0], output_tokens=4),
        sample(2.0, first_token=0.5, token_times=[0.5, 2.0], output_tokens=10),
        sample(0.1, error="503"),
        sample(30.0, error="timeout"),
    ]
    s = summarize("a", 4, samples, seconds=4.0)
    assert (s.requests, s.ok, s.errors) == (4, 2, {"503": 1, "timeout": 1})
    assert s.error_rate == 0.5
    assert s.qps == 0.5  # 2 completed in 4 s; failures are not throughput
    assert s.tokens_per_second == 3.5  # (4 + 10) / 4
    assert s.latency["p50"] == 1.5  # completed requests only
    assert s.first_token["p50"] == 0.35
    # Inter-token gaps pooled over requests: 0.2, 0.2, 0.4 and 1.5.
    assert s.inter_token["p50"] == pytest.approx(0.3)
    # Each request's decode speed: 3 tokens after the first in 0.8 s, 9 in 1.5 s.
    assert s.request_tokens_per_second["p50"] == pytest.approx((3 / 0.8 + 9 / 1.5) / 2)
    assert math.isnan(s.server_tokens_per_second["p50"])  # no eval_duration given


def test_percentiles_are_never_averaged_across_slices() -> None:
    """Two slices of one setup: the p99 is the p99 of all samples, not a mean of two."""
    fast = [sample(0.1) for _ in range(99)]
    slow = [sample(10.0)]
    whole = summarize("a", 4, fast + slow, seconds=2.0)
    mean_of_parts = statistics.mean(
        [summarize("a", 4, fast, 1.0).latency["p99"], summarize("a", 4, slow, 1.0).latency["p99"]]
    )
    assert whole.latency["p99"] == pytest.approx(0.199)  # rank 98.01 of 0..99
    assert mean_of_parts == pytest.approx(5.05)  # what averaging would have claimed


# -- arrivals and rounds -----------------------------------------------------------------------


def test_constant_arrivals_are_evenly_spaced_and_poisson_ones_average_to_the_rate() -> None:
    constant = arrival_gaps(4.0, "constant", random.Random(0))
    assert [next(constant) for _ in range(3)] == [0.25, 0.25, 0.25]
    poisson = arrival_gaps(4.0, "poisson", random.Random(7))
    gaps = [next(poisson) for _ in range(20_000)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd = mean


def test_requests_are_shared_out_over_rounds() -> None:
    assert round_shares(10, 4) == [3, 3, 2, 2]
    assert sum(round_shares(7, 3)) == 7


# -- requests and answers ----------------------------------------------------------------------


def test_bodies_in_both_apis() -> None:
    ollama = Workload("ollama", "chat", "m", ("q0", "q1"), max_tokens=8)
    assert orjson.loads(ollama.body(3)) == {
        "model": "m",
        "messages": [{"role": "user", "content": "q1"}],
        "stream": True,
        "options": {"num_predict": 8},
    }
    assert ollama.path == "/api/chat"
    openai = Workload("openai", "generate", "m", ("q",), stream=True, max_tokens=8)
    assert orjson.loads(openai.body(0)) == {
        "model": "m",
        "prompt": "q",
        "stream": True,
        "max_tokens": 8,
        "stream_options": {"include_usage": True},
    }
    assert openai.path == "/v1/completions"
    embed = Workload("openai", "embed", "e", ("q",))
    assert (embed.path, embed.streams, orjson.loads(embed.body(0))) == (
        "/v1/embeddings",
        False,
        {"model": "e", "input": "q"},
    )


def test_an_ollama_stream_gives_token_times_and_the_servers_counts() -> None:
    s = Sample("a", 1, 0.0)
    reader = AnswerReader(Workload("ollama", "chat", "m"), s)
    reader.line(b'{"message":{"role":"assistant","content":"Hi"},"done":false}\n', 0.1)
    reader.line(b'{"message":{"role":"assistant","content":" there"},"done":false}\n', 0.15)
    final = b'{"message":{"content":""},"done":true,"prompt_eval_count":7,"eval_count":2,'
    reader.line(final + b'"eval_duration":40000000}\n', 0.16)
    assert (s.first_token, s.token_times) == (0.1, [0.1, 0.15])
    assert (s.prompt_tokens, s.output_tokens, s.server_decode_seconds) == (7, 2, 0.04)
    assert s.ok


def test_an_openai_stream_with_usage_and_a_stream_that_breaks_off() -> None:
    s = Sample("a", 1, 0.0)
    reader = AnswerReader(Workload("openai", "chat", "m"), s)
    for line, at in [
        (b'data: {"choices":[{"delta":{"role":"assistant"}}]}', 0.05),
        (b"", 0.05),
        (b'data: {"choices":[{"delta":{"content":"A"}}]}', 0.1),
        (b": keep-alive", 0.1),
        (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}', 0.2),
        (b"data: [DONE]", 0.2),
    ]:
        reader.line(line, at)
    assert (s.first_token, s.tokens, s.prompt_tokens) == (0.1, 1, 3)
    broken = Sample("a", 1, 0.0)
    AnswerReader(Workload("ollama", "chat", "m"), broken).line(b'{"error":"backend cut"}', 1)
    assert broken.error == "stream error"


def test_whole_answers_give_their_counts() -> None:
    s = Sample("a", 1, 0.0)
    AnswerReader(Workload("openai", "chat", "m", stream=False), s).whole(
        b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":5,"completion_tokens":9}}'
    )
    assert (s.prompt_tokens, s.output_tokens, s.first_token) == (5, 9, None)
    bad = Sample("a", 1, 0.0)
    AnswerReader(Workload("ollama", "chat", "m", stream=False), bad).whole(b"<html>")
    assert bad.error == "bad answer"


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("first question\n\n  second  \n")
    assert load_prompts(text) == ["first question", "second"]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('"plain"\n{"prompt": "p"}\n{"text": "t"}\n')
    assert load_prompts(lines) == ["plain", "p", "t"]
    lines.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(PromptError, match=r"prompts.jsonl:2: expected"):
        load_prompts(lines)
    with pytest.raises(PromptError, match="cannot read"):
        load_prompts(tmp_path / "absent.txt")


# -- the report --------------------------------------------------------------------------------


def two_setup_result() -> Result:
    plan = Plan(
        setups=(Setup("direct", "http://a"), Setup("gateway", "http://b")),
        workload=Workload("ollama", "chat", "qwen2.5:7b", max_tokens=64),
        mode="concurrency",
        levels=(4,),
        requests=2,
        rounds=2,
    )
    result = Result(plan)
    for label, latency in (("direct", 1.0), ("gateway", 0.5)):
        for _ in range(2):
            result.samples.append(
                Sample(label, 4, 0.0, latency=latency, first_token=latency / 4, output_tokens=10)
            )
        result.slices += [Slice(label, 4, r, 0.0, latency, 1) for r in range(2)]
    return result


def test_the_markdown_table_has_the_seeds_columns_and_the_ratios() -> None:
    table = markdown(two_setup_result())
    assert "| setup | concurrency | requests | errors | P50 latency | p99 latency | QPS " in table
    assert "| direct | 4 | 2 | 0 | 1.00 s | 1.00 s | 1.00 | 10.0 | 250 ms | 250 ms |" in table
    assert "| gateway | 4 | 2 | 0 | 500 ms | 500 ms | 2.00 | 20.0 | 125 ms | 125 ms |" in table
    assert "| gateway | 4 | 2.00x | 2.00x | 0.50x | 0.50x | 0.50x |" in table


def test_the_json_report_is_complete_and_strict_json() -> None:
    report = as_json(two_setup_result())
    assert report["schema"] == "parallama-bench/1"
    assert report["plan"]["model"] == "qwen2.5:7b"
    (first, second) = report["summaries"]
    assert set(first) >= {
        "setup",
        "level",
        "requests",
        "ok",
        "errors",
        "error_rate",
        "qps",
        "tokens_per_second",
        "latency",
        "first_token",
        "inter_token",
        "request_tokens_per_second",
        "server_tokens_per_second",
    }
    assert second["qps"] == 2.0
    assert first["inter_token"]["p50"] is None  # NaN is not JSON: null
    assert len(report["slices"]) == 4
    orjson.loads(orjson.dumps(report))


def test_labelled_targets_split_at_the_first_equals_sign() -> None:
    (labelled,) = setups(["a=http://h:1/?x=1"], compare_pooling=False)
    assert (labelled.label, labelled.url) == ("a", "http://h:1/?x=1")
