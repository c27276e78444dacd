"""Which endpoint a call tries next, how long it waits first, and when it gives up (sans-I/O).

Endpoints are taken in turn from one call to the next (spreading the load); within a call a
failed try moves straight on to an endpoint not yet tried, and only when all have failed does
the call wait: exponential backoff with full jitter, or longer if the server said `Retry-After`.
An endpoint that keeps failing opens its circuit breaker and is tried only when no other is
left, until the client's background check finds it answering again.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from parallama.core.breaker import Breaker, BreakerState

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # tries after the first one
    backoff: float = 0.5  # seconds: the first wait's upper bound, doubling each round
    max_backoff: float = 8.0
    deadline: float | None = 120.0  # seconds after which no new try starts (waits included);
    # a try under way is bounded by the read timeout, not by this


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the HTTP-date form is not used by Ollama or parallama)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Endpoints:
    """The base URLs a client may use, each with its breaker (shared by threads and calls)."""

    def __init__(self, urls: list[str], threshold: int = 3) -> None:
        if not urls:
            raise ValueError("a client needs at least one endpoint")
        self.urls = [url.rstrip("/") for url in urls]
        # No cooldown: an open endpoint closes again only when a check finds it answering.
        self._breakers = {url: Breaker(threshold, cooldown=float("inf")) for url in self.urls}
        self._turn = 0
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """This call's endpoints, starting with the next in turn; open ones last."""
        with self._lock:
            start = self._turn % len(self.urls)
            self._turn += 1
            rotated = self.urls[start:] + self.urls[:start]
            closed = [u for u in rotated if self._breakers[u].state is BreakerState.CLOSED]
            return closed + [u for u in rotated if u not in closed]

    def failed(self, url: str, now: float) -> None:
        with self._lock:
            self._breakers[url].failure(now)

    def succeeded(self, url: str) -> None:
        with self._lock:
            self._breakers[url].success()

    def open(self) -> list[str]:
        """The endpoints whose breaker is open: what the background check looks at."""
        with self._lock:
            return [u for u in self.urls if self._breakers[u].state is not BreakerState.CLOSED]


class OutOfTries(Exception):
    """No try left (or no time): the caller raises the last error."""


class Attempts:
    """One call's tries."""

    def __init__(
        self, endpoints: Endpoints, policy: RetryPolicy, now: float, rng: random.Random
    ) -> None:
        self._endpoints = endpoints
        self._policy = policy
        self._order = endpoints.order()
        self._started = now
        self._rng = rng
        self._tries = 0
        self._retry_after: float | None = None

    def next(self, now: float) -> tuple[str, float]:
        """The endpoint to try next and the seconds to wait before; `OutOfTries` if none."""
        if self._tries > self._policy.retries:
            raise OutOfTries
        round_, position = divmod(self._tries, len(self._order))
        wait = 0.0
        if self._tries and position == 0:  # every endpoint failed this round: back off
            ceiling = min(self._policy.max_backoff, self._policy.backoff * 2 ** (round_ - 1))
            wait = max(self._rng.uniform(0, ceiling), self._retry_after or 0.0)
            self._retry_after = None
        deadline = self._policy.deadline
        if deadline is not None and now + wait - self._started > deadline:
            raise OutOfTries
        self._tries += 1
        return self._order[position], wait

    def failed(
        self, url: str, now: float, *, retry_after: float | None = None, dead: bool = True
    ) -> None:
        """A try failed: `dead` if the endpoint did not answer (a busy one did: 429, 503)."""
        if dead:
            self._endpoints.failed(url, now)
        if retry_after is not None:
            self._retry_after = max(self._retry_after or 0.0, retry_after)

    def succeeded(self, url: str) -> None:
        self._endpoints.succeeded(url)

    def answered(self, url: str, status: int, retry_after: str | None, now: float) -> bool:
        """An endpoint answered `status`: True if the call should try again (429 and 503 say
        busy, 502 and 504 that what is behind it failed)."""
        if status not in RETRY_STATUSES:
            self.succeeded(url)
            return False
        busy = status in (429, 503)
        self.failed(url, now, retry_after=parse_retry_after(retry_after), dead=not busy)
        return True
