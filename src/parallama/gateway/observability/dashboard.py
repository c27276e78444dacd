"""The live dashboard: `GET /parallama/` is a page with no data of its own (it is shipped in the
package, nothing is fetched from elsewhere), fed by `GET /parallama/feed` (server-sent events: a
snapshot of the fleet every second) and `GET /parallama/snapshot` (one, as JSON). The feed and
the snapshot need what the admin routes need: the admin token, or a loopback client.

The numbers come from what the gateway keeps anyway (the scheduler, the probes, the keys'
counters) and from a short memory of the requests that ended: a bucket per second for the last
minute, with a bounded sample of latencies per model, so that neither a burst nor a client that
makes up model names can grow it. Never a prompt, an answer or a key: failures show the status
and the reason the gateway gave.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from parallama import __version__
from parallama.core.exchange import Exchange
from parallama.errors import excerpt
from parallama.gateway.http.server import ClientGone, Reply, Request, send_json
from parallama.gateway.observability.metrics import ModelLabels
from parallama.gateway.observability.status import backend_state

if TYPE_CHECKING:
    from parallama.gateway.app import Gateway

WINDOW = 60  # seconds: the rates and percentiles are over the last minute
_SAMPLES = 256  # latencies kept per model and second (a reservoir: later ones replace at random)
_FAILURES = 20
_FEED_SECONDS = 1.0
_HTML = b"text/html; charset=utf-8"
_EVENTS = b"text/event-stream"


@dataclass
class _Second:
    """The requests that ended in one second."""

    at: int
    requests: Counter[str] = field(default_factory=Counter)  # per backend
    errors: Counter[str] = field(default_factory=Counter)  # per backend: 5xx, cut, failed
    tokens: Counter[str] = field(default_factory=Counter)  # generated, per backend
    ended: Counter[str] = field(default_factory=Counter)  # per model
    latency: dict[str, list[float]] = field(default_factory=dict)  # per model, seconds
    first_token: dict[str, list[float]] = field(default_factory=dict)  # per model, streams


def _keep(samples: dict[str, list[float]], model: str, value: float, seen: int) -> None:
    """At most `_SAMPLES` a second: past that, the `seen`-th of the second takes a slot with
    chance `_SAMPLES / seen` (reservoir sampling; a multiplicative hash of the count stands in
    for a random source), so the sample stays even over the whole second."""
    kept = samples.setdefault(model, [])
    if len(kept) < _SAMPLES:
        kept.append(value)
    elif (slot := ((seen * 2654435761) & 0xFFFFFFFF) % seen) < _SAMPLES:
        kept[slot] = value


class Recent:
    """The last minute of ended requests, a bucket a second; and the last failures."""

    def __init__(self, labels: Callable[[str], str], clock: Callable[[], float]) -> None:
        self._labels = labels
        self._clock = clock
        self._seconds: deque[_Second] = deque()
        self.failures: deque[dict[str, Any]] = deque(maxlen=_FAILURES)

    def observe(self, exchange: Exchange) -> None:
        if exchange.model is None:
            return
        second = self._current()
        model = self._labels(exchange.model)
        second.ended[model] += 1
        backend = exchange.backend
        failed = exchange.outcome == "failed" or exchange.status >= 500
        if backend is not None:
            second.requests[backend] += 1
            second.errors[backend] += failed
            if exchange.usage is not None:
                second.tokens[backend] += exchange.usage.generated_tokens or 0
        seconds = exchange.seconds
        if exchange.outcome == "completed" and seconds is not None:
            _keep(second.latency, model, seconds, second.ended[model])
            if (first := exchange.first_token_seconds) is not None:
                _keep(second.first_token, model, first, second.ended[model])
        if exchange.status >= 400 or exchange.outcome == "failed":
            self.failures.appendleft(
                {
                    "time": time.time(),
                    "model": model,
                    "backend": backend,
                    "status": exchange.status,
                    "outcome": exchange.outcome,
                    "reason": excerpt(exchange.error or "", 200) or None,
                }
            )

    def _current(self) -> _Second:
        now = int(self._clock())
        if not self._seconds or self._seconds[-1].at != now:
            self._seconds.append(_Second(now))
        self._forget(now)
        return self._seconds[-1]

    def _forget(self, now: int) -> None:
        while self._seconds and self._seconds[0].at <= now - WINDOW:
            self._seconds.popleft()

    def seconds(self) -> list[_Second]:
        self._forget(int(self._clock()))
        return list(self._seconds)


def _quantile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def _per_model(
    seconds: Iterable[_Second], pick: Callable[[_Second], dict[str, list[float]]]
) -> dict[str, list[float]]:
    merged: dict[str, list[float]] = {}
    for second in seconds:
        for model, values in pick(second).items():
            merged.setdefault(model, []).extend(values)
    return merged


class Dashboard:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._started = time.monotonic()
        labels = ModelLabels(gateway.scheduler.lists)
        self.recent = Recent(labels, time.monotonic)
        self._made, self._made_at = b"", -math.inf

    async def page(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """The live page, for a browser (it reads `/parallama/feed`)."""
        reply.send(200, _page(), _HTML, [(b"cache-control", b"no-store")])

    async def snapshot(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """What the live page shows, once, as JSON (under the admin rule)."""
        self._gateway.admin.authorize(request)
        send_json(reply, self.state())

    async def feed(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """A snapshot a second as server-sent events, until the client goes (or the gateway
        stops: its connections are closed)."""
        self._gateway.admin.authorize(request)
        reply.start(200, [(b"cache-control", b"no-store")], _EVENTS)
        try:
            while True:
                await reply.write(self._event())
                await asyncio.sleep(_FEED_SECONDS)
        except ClientGone:
            return

    def _event(self) -> bytes:
        """The snapshot as an event, made once for every open dashboard in the same moment."""
        now = time.monotonic()
        if now - self._made_at >= _FEED_SECONDS / 2:
            self._made = b"data: " + orjson.dumps(self.state()) + b"\n\n"
            self._made_at = now
        return self._made

    def state(self) -> dict[str, Any]:
        """The fleet now, and over the last minute."""
        gateway = self._gateway
        scheduler = gateway.scheduler
        seconds = self.recent.seconds()
        now = time.monotonic()
        # Rates over the seconds from the first bucket kept up to now: a lull counts too.
        span = int(now) - seconds[0].at + 1 if seconds else 1
        requests: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        ended: Counter[str] = Counter()
        for second in seconds:
            requests.update(second.requests)
            errors.update(second.errors)
            tokens.update(second.tokens)
            ended.update(second.ended)
        latency = _per_model(seconds, lambda s: s.latency)
        first_token = _per_model(seconds, lambda s: s.first_token)
        waits = scheduler.oldest_waits(now)
        running = {model for b in scheduler.backends.values() for model in b.in_flight}
        models = sorted(set(ended) | set(waits) | running)
        status = {
            "version": __version__,
            "time": time.time(),
            "uptime": now - self._started,
            "window": WINDOW,
            "totals": scheduler.accounting(),
            "backends": [
                {
                    **backend_state(b),
                    "requests_per_second": requests[b.name] / span,
                    "tokens_per_second": tokens[b.name] / span,
                    "errors": errors[b.name],
                }
                for b in scheduler.backends.values()
            ],
            "models": [
                {
                    "name": model,
                    "queued": scheduler.queue_depth(model),
                    "in_flight": sum(b.in_flight[model] for b in scheduler.backends.values()),
                    "oldest_wait": waits.get(model, 0.0),
                    "requests_per_second": ended[model] / span,
                    "latency_p50": _quantile(latency.get(model, []), 0.5),
                    "latency_p99": _quantile(latency.get(model, []), 0.99),
                    "first_token_p50": _quantile(first_token.get(model, []), 0.5),
                    "first_token_p99": _quantile(first_token.get(model, []), 0.99),
                }
                for model in models
            ],
            "failures": list(self.recent.failures),
        }
        access = gateway.access
        if access is not None:
            status["keys"] = access.usage_by_key()
        for name, section in gateway.status_sections.items():
            status[name] = section()
        return status


@functools.cache
def _page() -> bytes:
    return (
        importlib.resources.files("parallama.gateway.observability")
        .joinpath("dashboard.html")
        .read_bytes()
    )
