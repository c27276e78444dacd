"""A benchmark's results for people (a markdown table in the seed's columns, plus time to first
token and p99, and each setup's ratio to the first) and for machines (JSON)."""

from __future__ import annotations

import math
from typing import Any

from parallama import __version__
from parallama.bench.runner import Result, describe
from parallama.bench.stats import Summary

SCHEMA = "parallama-bench/1"


def seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _level(summary: Summary, mode: str) -> str:
    return f"{summary.level:g}" + {"rate": "/s", "replay": "x", "sessions": "/s"}.get(mode, "")


def _errors(summary: Summary) -> str:
    """Refused and failed requests by kind, and their share of all."""
    if not summary.errors:
        return "0"
    kinds = ", ".join(f"{n}x {kind}" for kind, n in sorted(summary.errors.items()))
    return f"{kinds} ({summary.error_rate:.0%})"


def markdown(result: Result, *, interleaved: bool = True) -> str:
    """`interleaved`: the setups shared the run's time in slices (not so in a simulation)."""
    plan = result.plan
    w = plan.workload
    summaries = result.summaries()
    level_name = {
        "concurrency": "concurrency", "rate": "rate", "replay": "speed", "sessions": "sessions"
    }[plan.mode]  # fmt: skip
    what = f"{w.kind} via the {w.api} API" + (", streamed" if w.streams else "")
    limit = f", up to {w.max_tokens} tokens" if w.max_tokens else ""
    if w.trace:
        models = sorted({t.model for t in w.trace})
        span = w.trace[-1].time
        title = f"a trace of {len(w.trace)} requests over {span:.0f} s ({', '.join(models)})"
    elif w.sessions:
        shape = w.sessions
        title = (
            f"{w.model}: {shape.count} agent sessions of {shape.turns} turns (a "
            f"{shape.system_tokens}-token system prompt, {shape.tool_tokens}-token tool results) "
            f"via the {w.api} API{limit}"
        )
    else:
        title = f"{w.model}: {what}{limit}"
    waits = any(not math.isnan(s.queue_wait["p50"]) for s in summaries)
    wait_head, wait_rule = (" wait p50 | wait p99 |", "---|---|") if waits else ("", "")
    lines = [
        title,
        "",
        f"| setup | {level_name} | requests | errors | P50 latency | p99 latency | QPS "
        f"| tokens/s | TTFT p50 | TTFT p99 |{wait_head}",
        f"|---|---|---|---|---|---|---|---|---|---|{wait_rule}",
    ]
    for s in summaries:
        wait = f" {seconds(s.queue_wait['p50'])} | {seconds(s.queue_wait['p99'])} |"
        lines.append(
            f"| {s.setup} | {_level(s, plan.mode)} | {s.requests} | {_errors(s)} "
            f"| {seconds(s.latency['p50'])} | {seconds(s.latency['p99'])} | {s.qps:.2f} "
            f"| {s.tokens_per_second:.1f} | {seconds(s.first_token['p50'])} "
            f"| {seconds(s.first_token['p99'])} |" + (wait if waits else "")
        )
    if len(plan.setups) > 1:
        lines += ["", *_ratios(summaries, plan.mode, interleaved)]
    return "\n".join(lines)


def _ratios(summaries: list[Summary], mode: str, interleaved: bool) -> list[str]:
    """Each setup against the first one at the same level."""
    first = summaries[0].setup
    how = " (measured interleaved in this run)" if interleaved else ""
    lines = [
        f"Ratios to {first}{how}:",
        "",
        "| setup | level | QPS | tokens/s | P50 latency | p99 latency | TTFT p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {s.level: s for s in summaries if s.setup == first}
    for s in summaries:
        if s.setup == first:
            continue
        b = base[s.level]
        cells = [
            _ratio(s.qps, b.qps),
            _ratio(s.tokens_per_second, b.tokens_per_second),
            _ratio(s.latency["p50"], b.latency["p50"]),
            _ratio(s.latency["p99"], b.latency["p99"]),
            _ratio(s.first_token["p50"], b.first_token["p50"]),
        ]
        lines.append(f"| {s.setup} | {_level(s, mode)} | " + " | ".join(cells) + " |")
    return lines


def _ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "-"
    ratio = value / base
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"


def as_json(result: Result) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "parallama": __version__,
        "plan": describe(result.plan),
        "summaries": [s.as_dict() for s in result.summaries()],
        "slices": [s.__dict__ for s in result.slices],
    }


def worst_error_rate(result: Result) -> float:
    return max((s.error_rate for s in result.summaries()), default=0.0)
