"""One re-armable timer at a deadline on the state machine's clock (`time.monotonic()`, or a
simulation's virtual one), for the drivers of sans-I/O state machines: after each change they ask
the machine for its next wakeup and set the alarm to it."""

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

    def set(self, deadline: float | None) -> None:
        """Ring at `deadline` (on the clock) instead of any earlier setting; None: never."""
        if deadline == self._deadline and (deadline is None or self._handle is not None):
            return  # as it is: the common case, asked after every change
        self.cancel()
        self._deadline = deadline
        if deadline is not None:
            delay = max(deadline - self._clock(), 0.0)
            self._handle = asyncio.get_running_loop().call_later(delay, self._ring)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _ring(self) -> None:
        # The event loop may run a timer up to its clock's resolution early; a machine asked
        # a hair before its deadline would do nothing and name the same deadline again (on a
        # virtual clock, for ever): wait out the rest.
        if self._deadline is not None and self._clock() < self._deadline:
            self.set(self._deadline)
            return
        self._handle = None
        self._callback()
