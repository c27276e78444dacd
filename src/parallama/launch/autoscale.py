"""When `parallama up` should start another engine of a group, or stop one (sans-I/O: the caller
passes what the gateway sees and the clock; the decisions come back).

- **Up:** the oldest request waiting has waited longer than `wait_up` for `sustain` seconds
  (a burst that drains by itself starts nothing), no engine of the group is still starting
  (a slow load is not answered with another start), and fewer than `max` engines run or start.
- **From zero:** a request that no engine running or starting anywhere can take starts one at
  once; it waits in the queue meanwhile (its client sees the wait in `X-Queue-Wait-Ms`, not an
  error). So does having fewer than `min`.
- **Down:** an engine with nothing in flight for `idle_after` seconds is stopped, while more
  than `min` run and nothing waits; the one idle longest goes first.
- `cooldown` seconds between two decisions, but for the starts from zero and up to `min`.
- After a start that failed, none for a while (doubling with each failure in a row).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MAX_HOLD = 60.0  # seconds without a start, at most, after starts that failed


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    min: int = 0
    max: int = 1
    wait_up: float = 2.0  # seconds the oldest waiting request may wait before it counts
    sustain: float = 5.0  # seconds it must go on before an engine is started
    idle_after: float = 300.0  # seconds without work before an engine is stopped
    cooldown: float = 10.0  # seconds between two decisions

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max or self.max < 1:
            raise ValueError(f"autoscaling needs 0 <= min <= max and max >= 1: {self}")


@dataclass(frozen=True, slots=True)
class Seen:
    """What the gateway sees now, for one group."""

    oldest_wait: float  # seconds the longest-waiting request of its models has waited; 0: none
    queued: int  # requests of its models waiting
    idle_since: Mapping[str, float | None]  # per engine not stopped: None while busy or starting
    starting: int = 0  # of those engines, how many are starting
    stranded: int = 0  # of the requests waiting, those no engine running or starting can take


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "start" or "stop"
    instance: str | None  # which engine to stop
    reason: str


class Autoscaler:
    def __init__(self, policy: ScalePolicy) -> None:
        self.policy = policy
        self._waiting_since: float | None = None  # when the wait first went over `wait_up`
        self._last_decision = -math.inf
        self._failed_starts = 0  # in a row
        self._no_start_until = -math.inf

    def decide(self, seen: Seen, now: float) -> Decision | None:
        if seen.oldest_wait > self.policy.wait_up:
            if self._waiting_since is None:
                self._waiting_since = now
        else:
            self._waiting_since = None
        reason = self._start_reason(seen, now)
        if reason is not None:
            if now < self._no_start_until:
                return None
            self._waiting_since = None  # the new engine gets its chance before another
            return self._decided(now, Decision("start", None, reason))
        stop = self._stop_candidate(seen, now)
        return None if stop is None else self._decided(now, stop)

    def start_failed(self, now: float) -> None:
        """The engine it said to start did not serve: no start for a while, from 1 s doubling
        with each failure in a row up to `MAX_HOLD`, so a broken engine is not spawned in a loop
        (the requests waiting for it time out in the queue meanwhile)."""
        self._failed_starts += 1
        self._no_start_until = now + min(2.0 ** (self._failed_starts - 1), MAX_HOLD)

    def start_succeeded(self) -> None:
        self._failed_starts = 0
        self._no_start_until = -math.inf

    def _start_reason(self, seen: Seen, now: float) -> str | None:
        policy, engines = self.policy, len(seen.idle_since)
        if engines < policy.min:
            return f"fewer than min={policy.min}"
        if engines >= policy.max:
            return None
        if seen.stranded:
            return "a request waits that no engine can take"
        if (
            now - self._last_decision >= policy.cooldown
            and not seen.starting
            and self._waiting_since is not None
            and now - self._waiting_since >= policy.sustain
        ):
            return f"requests waited over {policy.wait_up:g} s for {policy.sustain:g} s"
        return None

    def _stop_candidate(self, seen: Seen, now: float) -> Decision | None:
        """The engine idle longest, if it has been idle long enough and may go."""
        policy = self.policy
        if now - self._last_decision < policy.cooldown:
            return None
        idle = {name: since for name, since in seen.idle_since.items() if since is not None}
        if seen.queued or len(seen.idle_since) <= policy.min or not idle:
            return None
        name, since = min(idle.items(), key=lambda item: (item[1], item[0]))
        if now - since < policy.idle_after:
            return None
        return Decision("stop", name, f"idle for {policy.idle_after:g} s")

    def _decided(self, now: float, decision: Decision) -> Decision:
        self._last_decision = now
        return decision
