"""What a benchmark run measured, and what it comes to (sans-I/O).

Every request becomes a `Sample`; a `Summary` is computed from all the samples of one setup at
once, never from summaries of parts: a percentile of percentiles means nothing, so a setup run in
several interleaved slices is summarised over all of its samples, and its throughput is its
requests over the time its slices took.

Percentiles are exact, by linear interpolation between the two nearest ranks (numpy's default),
over the full list of values: a run has at most a few hundred thousand of them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Sample:
    """One request as the client saw it. Times in seconds from when it was sent."""

    setup: str
    level: float  # the concurrency or the rate it ran at
    sent: float  # on the run's clock, for the order of events
    latency: float = 0.0  # until the answer's last byte
    first_token: float | None = None  # streams only
    token_times: list[float] = field(default_factory=list)  # when each content chunk came
    prompt_tokens: int | None = None  # as the API counted them
    output_tokens: int | None = None
    server_decode_seconds: float | None = None  # Ollama's eval_duration
    queue_wait: float | None = None  # in the gateway's queue, as its X-Queue-Wait-Ms told
    error: str | None = None  # its kind: "503", "429", "timeout", "connection", ...

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def inter_token(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def tokens(self) -> int:
        """Output tokens: the API's count, else the content chunks seen."""
        return self.output_tokens if self.output_tokens is not None else len(self.token_times)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, exact, interpolating between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90 and p99 of `values` (NaN when there are none)."""
    return {f"p{round(q * 100)}": percentile(values, q) for q in QUANTILES}


@dataclass(frozen=True)
class Summary:
    setup: str
    level: float
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float  # the time the setup's slices took, added up
    qps: float  # completed requests per second
    tokens_per_second: float  # output tokens of completed requests per second, all together
    latency: dict[str, float]
    first_token: dict[str, float]
    queue_wait: dict[str, float]  # of the answers that told it (through the gateway)
    inter_token: dict[str, float]
    request_tokens_per_second: dict[str, float]  # each request's own decode speed
    server_tokens_per_second: dict[str, float]  # the engine's (eval_count / eval_duration)
    prompt_tokens: int
    output_tokens: int

    @property
    def error_rate(self) -> float:
        return 0.0 if not self.requests else (self.requests - self.ok) / self.requests

    def as_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()} | {"error_rate": self.error_rate}


def summarize(setup: str, level: float, samples: Iterable[Sample], seconds: float) -> Summary:
    """One setup at one level: its samples and the time its slices took."""
    samples = list(samples)
    done = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in done)
    return Summary(
        setup=setup,
        level=level,
        requests=len(samples),
        ok=len(done),
        errors=dict(Counter(s.error for s in samples if s.error is not None)),
        seconds=seconds,
        qps=len(done) / seconds if seconds > 0 else math.nan,
        tokens_per_second=tokens / seconds if seconds > 0 else math.nan,
        latency=quantiles([s.latency for s in done]),
        first_token=quantiles([s.first_token for s in done if s.first_token is not None]),
        queue_wait=quantiles([s.queue_wait for s in done if s.queue_wait is not None]),
        inter_token=quantiles([gap for s in done for gap in s.inter_token]),
        request_tokens_per_second=quantiles([r for s in done if (r := _decode_rate(s))]),
        server_tokens_per_second=quantiles(
            [
                s.tokens / s.server_decode_seconds
                for s in done
                if s.server_decode_seconds and s.output_tokens
            ]
        ),
        prompt_tokens=sum(s.prompt_tokens or 0 for s in done),
        output_tokens=tokens,
    )


def _decode_rate(sample: Sample) -> float | None:
    """A request's output tokens over its time generating: from its first token for a stream,
    else over its whole latency."""
    start = sample.first_token if sample.first_token is not None else 0.0
    took = sample.latency - start
    if sample.tokens < 1 or took <= 0:
        return None
    counted = sample.tokens - 1 if sample.first_token is not None else sample.tokens
    return counted / took if counted > 0 else None


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined statistic is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
