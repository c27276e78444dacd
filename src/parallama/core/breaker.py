"""A circuit breaker per backend (sans-I/O): stop sending work to a backend that keeps failing,
and find out, with as little risk as possible, when it is back.

closed -> open after `threshold` consecutive failures (requests or probes). open -> half-open
once `cooldown` seconds have passed. half-open lets one request at a time through as a trial
(the next probe counts too): a success closes the breaker, a failure opens it again for another
cooldown. Failures may come from active probes or from real requests (connect refused, reset,
timeout, 5xx): both are reported here alike.
"""

from __future__ import annotations

import enum


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    def __init__(self, threshold: int = 3, cooldown: float = 10.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.trips = 0  # times it opened: what an operator graphs

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.threshold
        ):
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.trips += 1

    def open(self, now: float) -> None:
        """Open for a cooldown on another's word (a gateway that shares the backend found it
        failing): not counted as a trip of this one."""
        if self.state is not BreakerState.OPEN:
            self.state = BreakerState.OPEN
            self.opened_at = now

    def poll(self, now: float) -> None:
        """Let the cooldown end: open -> half-open."""
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.cooldown:
            self.state = BreakerState.HALF_OPEN

    def next_change(self) -> float | None:
        """When `poll` will next change the state, if it can."""
        return self.opened_at + self.cooldown if self.state is BreakerState.OPEN else None
