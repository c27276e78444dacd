"""Each key's limits, checked at admission (sans-I/O: the caller passes the clocks).

Windows are sliding minutes kept as logs, not token buckets, so that the answer is exact: with
`rpm = 60`, 60 requests of a burst are admitted and the 61st learns in `Retry-After` when the
oldest of them leaves the window. Tokens are counted when an answer ends (only then are they
known), so a key under its token limit may start one more answer than its limit holds: `tpm`
and the budget can be overshot by the answers in flight when the limit is reached, at most
`max_concurrent` of them.

Every answer to a keyed request carries OpenAI's rate-limit headers
(`x-ratelimit-limit-requests`, `-remaining-`, `-reset-`, and their `-tokens` twins) for the
limits the key has.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from parallama.errors import ApiError
from parallama.teams.keys import ApiKey, period_end, period_start

WINDOW = 60.0
Headers = list[tuple[bytes, bytes]]


class RateLimited(ApiError):
    """429: a limit of the key is reached; `Retry-After` says when it has room again, and
    `rate_headers` are the key's rate-limit headers for the answer."""

    def __init__(self, limit: str, message: str, retry_after: float, headers: Headers) -> None:
        wait = max(1, math.ceil(retry_after))
        retry = {"Retry-After": str(wait)}
        super().__init__(429, f"{message}; try again in {wait} s", retry, "rate_limit_exceeded")
        self.limit = limit
        self.rate_headers = headers


@dataclass(slots=True)
class _Use:
    """One key's recent use."""

    requests: deque[float] = field(default_factory=deque)  # admissions in the window
    answers: deque[tuple[float, int]] = field(default_factory=deque)  # (ended, tokens)
    window_tokens: int = 0  # the sum over `answers`
    in_flight: int = 0
    budget_used: int = 0  # tokens in the budget period that began at `budget_since`
    budget_since: float = 0.0


class Limits:
    def __init__(self) -> None:
        self._use: dict[str, _Use] = {}

    def admit(self, key: ApiKey, now: float, wall: float, windows: bool = True) -> Headers:
        """Count a request in, or raise `RateLimited`; the headers for its answer.
        `now` is monotonic (the windows), `wall` is Unix time (the budget's calendar). When
        several limits are reached, the one that frees last is the answer: its wait is the
        one that holds. `windows=False`: the budget only (the rest is counted in Redis)."""
        use = self._use.setdefault(key.name, _Use())
        self._expire(use, now)
        reached: list[tuple[float, str, str]] = []  # (wait, limit, message)
        if windows:
            if key.max_concurrent is not None and use.in_flight >= key.max_concurrent:
                reached.append(concurrency_reached(key.max_concurrent))
            if key.rpm is not None and len(use.requests) >= key.rpm:
                wait = use.requests[0] + WINDOW - now
                reached.append((wait, *requests_reached(key.rpm)))
            if key.tpm is not None and use.window_tokens >= key.tpm:
                wait = self._tokens_free_at(use, key.tpm) - now
                reached.append((wait, *tokens_reached(key.tpm)))
        budget = key.budget
        if budget is not None:
            self._renew_budget(key, use, wall)
            if use.budget_used >= budget.tokens:
                wait = period_end(budget.period, wall) - wall
                message = f"token budget of {budget.tokens} per {budget.period} used"
                reached.append((wait, "budget", message))
        if reached:
            wait, limit, message = max(reached)
            raise RateLimited(limit, message, wait, self.headers(key, now))
        if windows:
            use.requests.append(now)
        use.in_flight += 1
        return self.headers(key, now)

    def finish(
        self, key: ApiKey, tokens: int, now: float, wall: float, windows: bool = True
    ) -> None:
        """An admitted request is over, having used `tokens` (prompt + generated)."""
        use = self._use.get(key.name)
        if use is None:
            return
        use.in_flight = max(0, use.in_flight - 1)
        if tokens <= 0:
            return
        if key.tpm is not None and windows:
            use.answers.append((now, tokens))
            use.window_tokens += tokens
        if key.budget is not None:
            self._renew_budget(key, use, wall)
            use.budget_used += tokens

    def set_budget_used(self, name: str, tokens: int, since: float) -> None:
        """What the ledger says the key used in its budget period so far (at start, and from
        other gateways sharing the database)."""
        use = self._use.setdefault(name, _Use())
        use.budget_used, use.budget_since = tokens, since

    def in_flight(self, name: str) -> int:
        use = self._use.get(name)
        return 0 if use is None else use.in_flight

    def forget(self, names: set[str]) -> None:
        """Keys that no longer exist."""
        for name in names:
            self._use.pop(name, None)

    @staticmethod
    def _expire(use: _Use, now: float) -> None:
        since = now - WINDOW
        requests, answers = use.requests, use.answers
        while requests and requests[0] <= since:
            requests.popleft()
        while answers and answers[0][0] <= since:
            use.window_tokens -= answers.popleft()[1]

    @staticmethod
    def _tokens_free_at(use: _Use, tpm: int) -> float:
        """When enough answers have left the window for the key to be under `tpm` again."""
        left = use.window_tokens
        for ended, tokens in use.answers:
            left -= tokens
            if left < tpm:
                return ended + WINDOW
        return use.answers[-1][0] + WINDOW if use.answers else 0.0

    @staticmethod
    def _renew_budget(key: ApiKey, use: _Use, wall: float) -> None:
        assert key.budget is not None
        since = period_start(key.budget.period, wall)
        if use.budget_since != since:
            use.budget_used, use.budget_since = 0, since

    def headers(self, key: ApiKey, now: float) -> Headers:
        """The key's rate-limit headers as its windows stand at `now`."""
        use = self._use.get(key.name)
        if use is None:
            use = _Use()
        else:
            self._expire(use, now)
        requests_reset = use.requests[-1] + WINDOW - now if use.requests else 0.0
        tokens_reset = use.answers[-1][0] + WINDOW - now if use.answers else 0.0
        return rate_headers(key, len(use.requests), requests_reset, use.window_tokens, tokens_reset)


def rate_headers(
    key: ApiKey, requests: int, requests_reset: float, tokens: int, tokens_reset: float
) -> Headers:
    """OpenAI's rate-limit headers for the key's windows: `requests` admitted in the last
    minute, the newest leaving it in `requests_reset` seconds; `tokens` used, likewise."""
    headers: Headers = []
    if key.rpm is not None:
        headers += [
            (b"x-ratelimit-limit-requests", b"%d" % key.rpm),
            (b"x-ratelimit-remaining-requests", b"%d" % max(0, key.rpm - requests)),
            (b"x-ratelimit-reset-requests", duration(requests_reset).encode()),
        ]
    if key.tpm is not None:
        headers += [
            (b"x-ratelimit-limit-tokens", b"%d" % key.tpm),
            (b"x-ratelimit-remaining-tokens", b"%d" % max(0, key.tpm - tokens)),
            (b"x-ratelimit-reset-tokens", duration(tokens_reset).encode()),
        ]
    return headers


# The reasons a limit refuses a request: (limit, message), with the wait first for concurrency.
def concurrency_reached(allowed: int) -> tuple[float, str, str]:
    """An answer's end is not foreseen: a second's wait."""
    return 1.0, "concurrent", f"{allowed} concurrent requests allowed for this key"


def requests_reached(rpm: int) -> tuple[str, str]:
    return "requests", f"limit of {rpm} requests per minute"


def tokens_reached(tpm: int) -> tuple[str, str]:
    return "tokens", f"limit of {tpm} tokens per minute"


def duration(seconds: float) -> str:
    """A time as OpenAI's rate-limit headers write it: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 1):g}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"
