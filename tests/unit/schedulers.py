"""The gateway's scheduler as the unit tests build it: on a fake clock, with given backends."""

from __future__ import annotations

from parallama.core.backends import Backend
from parallama.core.scheduler import Scheduler, SchedulerSettings
from parallama.core.tickets import Ticket
from tests.clock import FakeClock

M = "qwen2.5:7b"


def make(*backends: Backend, clock: FakeClock | None = None, **settings: object) -> Scheduler:
    scheduler = Scheduler(SchedulerSettings(**settings), clock or FakeClock())  # type: ignore[arg-type]
    for backend in backends:
        scheduler.add_backend(backend)
    return scheduler


def adds_up(s: Scheduler) -> bool:
    """Every request counted once: the outcomes, in flight and queued add up to the total."""
    counts = s.accounting()
    return counts["total"] == sum(v for k, v in counts.items() if k != "total")


def names(tickets: list[Ticket]) -> list[str]:
    return [t.backend.name if t.backend else "-" for t in tickets]
