"""`GET /metrics`: the gateway in Prometheus' text format, one registry per gateway.

Counters and histograms are updated once per request from its `Exchange`, as plain numbers
(prometheus_client's own take a lock per update: a tenth of the gateway's time per request at 32
concurrent clients); queue depths, in-flight counts and slots are read from the scheduler when
Prometheus scrapes, so they cost nothing on the hot path. Model names come from clients, so only
the names some backend lists (or is configured with) get a label of their own; any other is
counted as `_other`, and a client cannot grow the series (20 distinct 2 MB names once made a
126 MB scrape).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from parallama.core.backends import Backend
from parallama.core.exchange import Exchange
from parallama.core.scheduler import Scheduler
from parallama.gateway.http.guard import Connections, Phase

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000)


class ModelLabels:
    """Model names as label values: those the fleet lists, and `_other` for the rest."""

    OTHER = "_other"

    def __init__(self, listed: Callable[[str], bool]) -> None:
        self._listed = listed
        self.seen: dict[str, None] = {}  # insertion-ordered set

    def __call__(self, model: str) -> str:
        if model in self.seen:
            return model
        if self._listed(model):
            self.seen[model] = None
            return model
        return self.OTHER


# Each backend's state, read at scrape time: name, help, value.
_BACKEND_GAUGES: tuple[tuple[str, str, Callable[[Backend], float]], ...] = (
    ("parallama_backend_in_flight", "Requests a backend is answering", lambda b: b.active),
    (
        "parallama_backend_slots",
        "A backend's parallel slots per model (learned, or halved for a while after 'server busy')",
        lambda b: b.capacity,
    ),
    (
        "parallama_backend_outside_requests",
        "Requests a backend says it runs beyond this gateway's (llama.cpp /slots, vLLM /metrics)",
        lambda b: b.outside,
    ),
    (
        "parallama_backend_healthy",
        "1 unless the backend's circuit breaker is open",
        lambda b: 1 if b.healthy else 0,
    ),
    (
        "parallama_backend_draining",
        "1 if the backend takes no new work",
        lambda b: 1 if b.draining else 0,
    ),
)


class _SchedulerCollector(Collector):
    """The scheduler's live state, read at scrape time."""

    def __init__(self, scheduler: Scheduler, labels: ModelLabels) -> None:
        self._scheduler = scheduler
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        s = self._scheduler
        depth = GaugeMetricFamily(
            "parallama_queue_depth", "Requests waiting for a slot, per model", labels=["model"]
        )
        depths: dict[str, int] = dict.fromkeys(self._labels.seen, 0)
        for model, waiting in s.queue_depths().items():
            label = self._labels(model)
            depths[label] = depths.get(label, 0) + waiting
        for model, waiting in depths.items():
            depth.add_metric([model], waiting)
        yield depth
        backends = s.backends.values()
        for name, documentation, value in _BACKEND_GAUGES:
            gauge = GaugeMetricFamily(name, documentation, labels=["backend"])
            for backend in backends:
                gauge.add_metric([backend.name], value(backend))
            yield gauge
        trips = CounterMetricFamily(
            "parallama_backend_breaker_trips",
            "Times the backend's circuit breaker opened",
            labels=["backend"],
        )
        for backend in backends:
            trips.add_metric([backend.name], backend.breaker.trips)
        yield trips


class _ConnectionCollector(Collector):
    """The client connections: open now, refused past the limit, closed for being too slow."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        c = self._connections
        yield GaugeMetricFamily(
            "parallama_client_connections", "Open client connections", value=len(c.open)
        )
        yield CounterMetricFamily(
            "parallama_client_connections_refused",
            "Client connections answered 503 because max_connections were open",
            value=c.refused,
        )
        timeouts = CounterMetricFamily(
            "parallama_client_timeouts",
            "Client connections closed for being too slow: to send a request's head, or to "
            "read its answer",
            labels=["phase"],
        )
        for phase in get_args(Phase):
            timeouts.add_metric([phase], c.timeouts[phase])
        yield timeouts


class _Counter:
    """A counter per label values, updated without a lock: the gateway updates it from its one
    event-loop thread, and a scrape reads it on the same thread."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class _Histogram:
    """A histogram per label values: a count per bucket (not cumulative until the scrape) and
    the sum; lock-free for the same reason as `_Counter`."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.bounds = list(buckets)
        self.values: dict[tuple[str, ...], list[float]] = {}  # buckets..., +Inf, sum

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.values.get(labels)
        if counts is None:
            counts = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect.bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, counts in self.values.items():
            cumulative = list(itertools.accumulate(counts[:-1]))
            buckets = [(str(b), c) for b, c in zip(self.bounds, cumulative, strict=False)]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric(labels, buckets, counts[-1])
        return family


class _RequestCollector(Collector):
    """The per-request counters and histograms, turned into metric families at scrape time."""

    def __init__(self, metrics: Sequence[_Counter | _Histogram]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield metric.family()


class GatewayMetrics:
    def __init__(self, scheduler: Scheduler, connections: Connections) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._models = ModelLabels(scheduler.lists)
        self._requests = _Counter(
            "parallama_requests",
            "Requests to model routes, by how they ended",
            ["model", "outcome"],
        )
        self._backend_requests = _Counter(
            "parallama_backend_requests",
            "Requests sent to each backend, by how they ended",
            ["backend", "outcome"],
        )
        self._duration = _Histogram(
            "parallama_request_duration_seconds",
            "Arrival to last byte of completed requests, queueing included",
            ["model"],
            LATENCY_BUCKETS,
        )
        self._queue_wait = _Histogram(
            "parallama_queue_wait_seconds",
            "Time waiting in the gateway for a backend slot",
            ["model"],
            LATENCY_BUCKETS,
        )
        self._ttft = _Histogram(
            "parallama_time_to_first_token_seconds",
            "Arrival to first streamed byte, queueing included",
            ["model"],
            TTFT_BUCKETS,
        )
        self._speed = _Histogram(
            "parallama_generation_tokens_per_second",
            "Decode speed of each completed generation",
            ["model"],
            TOKENS_PER_SECOND_BUCKETS,
        )
        self._prompt_tokens = _Counter(
            "parallama_prompt_tokens", "Prompt tokens processed", ["model"]
        )
        self._generated_tokens = _Counter(
            "parallama_generated_tokens", "Tokens generated", ["model"]
        )
        self._failovers = _Counter(
            "parallama_failovers",
            "Requests moved to another backend before their first byte, by the backend left",
            ["backend"],
        )
        registry.register(
            _RequestCollector(
                (
                    self._requests,
                    self._backend_requests,
                    self._duration,
                    self._queue_wait,
                    self._ttft,
                    self._speed,
                    self._prompt_tokens,
                    self._generated_tokens,
                    self._failovers,
                )
            )
        )
        registry.register(_SchedulerCollector(scheduler, self._models))
        registry.register(_ConnectionCollector(connections))

    def observe(self, exchange: Exchange) -> None:
        """Count a finished request of a model route (model "" when its body had none)."""
        outcome = exchange.outcome
        if outcome is None:
            return
        model = (self._models(exchange.model or ""),)
        self._requests.inc((*model, outcome))
        if exchange.backend is not None:
            self._backend_requests.inc((exchange.backend, outcome))
        for backend in exchange.failed_over:
            self._failovers.inc((backend,))
        if exchange.queue_seconds is not None:
            self._queue_wait.observe(model, exchange.queue_seconds)
        if outcome != "completed":
            return
        if exchange.seconds is not None:
            self._duration.observe(model, exchange.seconds)
        if (ttft := exchange.first_token_seconds) is not None:
            self._ttft.observe(model, ttft)
        if (speed := exchange.tokens_per_second) is not None:
            self._speed.observe(model, speed)
        usage = exchange.usage
        if usage is not None:
            self._prompt_tokens.inc(model, usage.prompt_tokens or 0)
            self._generated_tokens.inc(model, usage.generated_tokens or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
