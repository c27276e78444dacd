"""One re-armable timer at a deadline on a clock (`time.monotonic()`, the event loop's, or a
simulation's virtual one): for the drivers of sans-I/O state machines, which after each change
set it to the machine's next wakeup, and for connections' deadlines.

It is pushed back lazily: a later deadline keeps the timer already armed, which rings early,
sees the new deadline and arms itself again. Deadlines that move later with every request or
chunk (a keep-alive connection's, a stream's silence) then cost an assignment, not a timer
cancelled and another armed each time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Alarm:
    def __init__(
        self, callback: Callable[[], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._callback = callback
        self._clock = clock
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._rings_at = 0.0  # when the armed timer rings, on the clock

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def set(self, deadline: float | None) -> None:
        """Ring at `deadline` (on the clock) instead of any earlier setting; None: never."""
        self._deadline = deadline
        if deadline is None:
            self.cancel()
        elif self._handle is None or self._rings_at > deadline:
            self._arm(deadline)

    def cancel(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._rings_at = deadline
        delay = max(deadline - self._clock(), 0.0)
        self._handle = asyncio.get_running_loop().call_later(delay, self._ring)

    def _ring(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return
        # Pushed back since it was armed; or the event loop ran the timer up to its clock's
        # resolution early (a machine asked a hair before its deadline would do nothing and
        # name the same deadline again, on a virtual clock for ever): wait out the rest.
        if self._clock() < deadline:
            self._arm(deadline)
            return
        self._deadline = None
        self._callback()
