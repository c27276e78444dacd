"""Requests waiting in the gateway's scheduler for a backend, woken the moment it binds them.

The sans-I/O scheduler decides; this turns its decisions into resolved futures, and its next
deadline (a queue timeout, a breaker's cooldown) into a timer. The gateway uses it for real
requests, the capacity planner (`parallama plan`) for simulated ones on a virtual clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from parallama.alarm import Alarm
from parallama.core.scheduler import Scheduler
from parallama.core.tickets import Ticket


class Waiting:
    def __init__(self, scheduler: Scheduler, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._alarm = Alarm(self._on_alarm, clock)
        self.also: Callable[[], None] | None = None  # told of every change (shared slots)

    async def until_bound(self, ticket: Ticket) -> None:
        """Until the scheduler binds `ticket` to a backend, or ends it (a queue timeout)."""
        if ticket.backend is not None or ticket.outcome is not None:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        self.changed()
        try:
            await future
        finally:
            self._waiters.pop(ticket, None)

    def changed(self) -> None:
        """After any scheduler call: wake dispatched and timed-out waiters, re-arm the timer."""
        s = self.scheduler
        for ticket in [*s.take_dispatched(), *s.take_timed_out()]:
            future = self._waiters.get(ticket)
            if future is not None and not future.done():
                future.set_result(None)
        self._alarm.set(s.next_wakeup())
        if self.also is not None:
            self.also()

    def close(self) -> None:
        self._alarm.cancel()

    def _on_alarm(self) -> None:
        self.scheduler.tick()
        self.changed()
