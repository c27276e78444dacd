"""A clock that moves only when a test moves it: for the sans-I/O state machines, which take
their clock as an argument."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
