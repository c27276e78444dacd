"""Slots learned for a backend (`slots = "auto"`), sans-I/O: how many requests at once give it
the most tokens per second.

`OLLAMA_NUM_PARALLEL` is a guess: past some number of sequences an engine's aggregate tokens/s
stops rising (or falls, once its memory or cores run short) while every answer gets slower.
From each answer the gateway knows its generated tokens, how long it took from dispatch to its
end, and how many of its requests ran on the backend when it was sent: with `c` running, the
backend's aggregate speed is about `c` times one answer's tokens/s.

Hill climbing, one step at a time, as Netflix's concurrency limits do with latency: while
requests wait for this backend (there is demand to learn from), once `SAMPLES` answers at the
current limit have been seen, the limit rises by one; if the aggregate speed at a limit is not
`GAIN` above the one below it (or half of what a step could add at best, 1/(L-1), when that is
less), the limit steps back and stays there `SETTLE` seconds before it
tries one more again (engines and loads change). Never below `low` nor above `high`.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

SAMPLES = 4  # answers at a limit before it is judged
GAIN = 0.05  # how much more aggregate tokens/s a step up must give
SETTLE = 60.0  # seconds at a limit found best before one more is tried again


@dataclass
class SlotTuner:
    low: int
    high: int
    limit: int = 0  # 0: start at `low`
    speeds: dict[int, deque[float]] = field(default_factory=dict)  # per concurrency: tokens/s
    settled_until: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"adaptive slots need 1 <= min <= max: {self.low}, {self.high}")
        self.limit = min(max(self.limit or self.low, self.low), self.high)

    def aggregate(self, concurrency: int) -> float | None:
        """Tokens/s of the backend with `concurrency` requests, once seen often enough."""
        seen = self.speeds.get(concurrency)
        if seen is None or len(seen) < SAMPLES:
            return None
        return concurrency * statistics.median(seen)

    def observe(
        self, concurrency: int, tokens_per_second: float, now: float, waiting: bool
    ) -> bool:
        """An answer that ran with `concurrency` requests on the backend; True if the limit
        changed."""
        if concurrency < 1 or tokens_per_second <= 0:
            return False
        level = min(concurrency, self.limit)
        self.speeds.setdefault(level, deque(maxlen=4 * SAMPLES)).append(tokens_per_second)
        current = self.aggregate(self.limit)
        if current is None or level != self.limit:
            return False
        below = self.aggregate(self.limit - 1)
        # A step from L-1 to L adds 1/(L-1) at most (an engine that scales perfectly): half of
        # that is asked for past 11, so that engines of 64 sequences are not held at 20.
        wanted = min(GAIN, 0.5 / max(self.limit - 1, 1))
        if below is not None and current < below * (1 + wanted) and self.limit > self.low:
            self.limit -= 1  # the last step gained nothing: back, and stay a while
            self.settled_until = now + SETTLE
            return True
        if waiting and self.limit < self.high and now >= self.settled_until:
            self.limit += 1
            self.speeds.pop(self.limit, None)  # measured afresh: things may have changed
            return True
        return False
