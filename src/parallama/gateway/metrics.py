"""`GET /metrics`: the gateway in Prometheus' text format, one registry per gateway.

Counters and histograms are updated once per request from its `Exchange`; queue depths, in-flight
counts and slots are read from the scheduler when Prometheus scrapes, so they cost nothing on the
hot path. Model names come from clients, so only the names some backend lists (or is configured
with) get a label of their own; any other is counted as `_other`, and a client cannot grow the
series (20 distinct 2 MB names once made a 126 MB scrape).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar, cast, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from parallama.core.scheduler import Scheduler
from parallama.gateway.exchange import Exchange
from parallama.gateway.guard import Connections, Phase

M = TypeVar("M", Counter, Histogram)
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
        in_flight = GaugeMetricFamily(
            "parallama_backend_in_flight", "Requests a backend is answering", labels=["backend"]
        )
        slots = GaugeMetricFamily(
            "parallama_backend_slots",
            "A backend's parallel slots per model (halved for a while after 'server busy')",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "parallama_backend_healthy",
            "1 unless the backend's circuit breaker is open",
            labels=["backend"],
        )
        draining = GaugeMetricFamily(
            "parallama_backend_draining", "1 if the backend takes no new work", labels=["backend"]
        )
        trips = CounterMetricFamily(
            "parallama_backend_breaker_trips",
            "Times the backend's circuit breaker opened",
            labels=["backend"],
        )
        for backend in s.backends.values():
            name = [backend.name]
            in_flight.add_metric(name, backend.active)
            slots.add_metric(name, backend.capacity)
            healthy.add_metric(name, 1 if backend.healthy else 0)
            draining.add_metric(name, 1 if backend.draining else 0)
            trips.add_metric(name, backend.breaker.trips)
        yield from (in_flight, slots, healthy, draining, trips)


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


class GatewayMetrics:
    def __init__(self, scheduler: Scheduler, connections: Connections) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}
        self._models = ModelLabels(scheduler.lists)
        self._requests = Counter(
            "parallama_requests",
            "Requests to model routes, by how they ended",
            ["model", "outcome"],
            registry=registry,
        )
        self._backend_requests = Counter(
            "parallama_backend_requests",
            "Requests sent to each backend, by how they ended",
            ["backend", "outcome"],
            registry=registry,
        )
        self._duration = Histogram(
            "parallama_request_duration_seconds",
            "Arrival to last byte of completed requests, queueing included",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            "parallama_queue_wait_seconds",
            "Time waiting in the gateway for a backend slot",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._ttft = Histogram(
            "parallama_time_to_first_token_seconds",
            "Arrival to first streamed byte, queueing included",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self._speed = Histogram(
            "parallama_generation_tokens_per_second",
            "Decode speed of each completed generation",
            ["model"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=registry,
        )
        self._prompt_tokens = Counter(
            "parallama_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry
        )
        self._generated_tokens = Counter(
            "parallama_generated_tokens", "Tokens generated", ["model"], registry=registry
        )
        self._failovers = Counter(
            "parallama_failovers",
            "Requests moved to another backend before their first byte, by the backend left",
            ["backend"],
            registry=registry,
        )
        registry.register(_SchedulerCollector(scheduler, self._models))
        registry.register(_ConnectionCollector(connections))

    def failover(self, backend: str) -> None:
        self._series(self._failovers, backend).inc()

    def observe(self, exchange: Exchange) -> None:
        """Count a finished request of a model route (model "" when its body had none)."""
        if exchange.outcome is None:
            return
        model = self._models(exchange.model or "")
        series = self._series
        series(self._requests, model, exchange.outcome).inc()
        if exchange.backend is not None:
            series(self._backend_requests, exchange.backend, exchange.outcome).inc()
        if exchange.queue_seconds is not None:
            series(self._queue_wait, model).observe(exchange.queue_seconds)
        if exchange.outcome != "completed":
            return
        if exchange.seconds is not None:
            series(self._duration, model).observe(exchange.seconds)
        if (ttft := exchange.first_token_seconds) is not None:
            series(self._ttft, model).observe(ttft)
        if (speed := exchange.tokens_per_second) is not None:
            series(self._speed, model).observe(speed)
        usage = exchange.usage
        if usage is not None:
            series(self._prompt_tokens, model).inc(usage.prompt_tokens or 0)
            series(self._generated_tokens, model).inc(usage.generated_tokens or 0)

    def _series(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, remembered: the lookup costs more than the update."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(M, found)

    def render(self) -> bytes:
        return generate_latest(self.registry)
