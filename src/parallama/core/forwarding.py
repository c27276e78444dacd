"""One request's attempts at the backends, from its first binding to its one outcome (sans-I/O).

What a backend did decides what happens next, and the gateway (over sockets) and `parallama plan`
(on a virtual clock) must decide it alike, or the planner predicts another system than the one
that runs. So both drive this with what happened (the status a backend answered, a failure
before anything reached the client, a failure after, the end of the answer, the client leaving)
and it decides, on the scheduler: throttle a backend that said "server busy", feed the breakers,
move the request to another backend, or end it with one outcome and the error the client gets.

A request moves to another backend at most `retries` times; and at most once after a backend
may have worked on it (it had the whole request and dropped it, or fell silent), so that a prompt
that crashes engines cannot take the fleet down one engine after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parallama.core.scheduler import Outcome, Scheduler, Ticket

# Answers that another backend may do better with: the model is not installed here, or busy.
TRY_ELSEWHERE = frozenset({404, 503})
# Other backends a request may move to after one that may have worked on it.
WORKED_ON_ELSEWHERE = 1


@dataclass(frozen=True)
class Failure:
    """An attempt that failed before a byte reached the client.

    `reason` completes nothing: it is the sentence the client may read ("backend X answered
    503"). `broken`: the backend failed (for its breaker), rather than refused the request.
    `worked_on`: it had the whole request and may have worked on it."""

    status: int
    reason: str
    broken: bool = True
    worked_on: bool = False


@dataclass(frozen=True)
class GiveUp:
    """No other backend is to try: the client gets this error, the request has failed."""

    status: int
    message: str


class Forwarding:
    def __init__(
        self,
        scheduler: Scheduler,
        ticket: Ticket,
        retries: int,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`changed` is called whenever a scheduler call may have bound or woken a request
        (the driver's cue to wake its waiters)."""
        self._scheduler = scheduler
        self._ticket = ticket
        self._retries = retries
        self._changed = changed
        self._worked_on = 0
        self._reasons: list[str] = []

    @property
    def backend(self) -> str:
        """The backend of the current attempt."""
        assert self._ticket.backend is not None
        return self._ticket.backend.name

    def answered(self, status: int) -> Failure | None:
        """The backend's status arrived, before anything reached the client: a `Failure` if
        the request should rather go to another backend, else None (relay the answer)."""
        scheduler, backend = self._scheduler, self.backend
        if status == 503:  # "server busy": alive, but give it less work for a while
            scheduler.throttle(backend)
        if (
            status in TRY_ELSEWHERE
            and self._retries > 0
            and scheduler.has_alternative(self._ticket)
        ):
            return Failure(status, f"backend {backend} answered {status}", broken=False)
        self._report(ok=status < 500 or status == 503)
        return None

    def failed(self, failure: Failure) -> GiveUp | None:
        """The attempt failed before a byte reached the client: None if the request is waiting
        for another backend again (requeued), else what the client is told."""
        self._reasons.append(failure.reason)
        if failure.broken:
            self._report(ok=False)
        self._retries -= 1
        self._worked_on += failure.worked_on
        ticket = self._ticket
        may_move = self._retries >= 0 and ticket.outcome is None
        may_move &= self._worked_on <= WORKED_ON_ELSEWHERE
        if may_move and self._scheduler.requeue(ticket):
            self._changed()
            return None
        self._end(Outcome.FAILED)
        if self._worked_on > WORKED_ON_ELSEWHERE:
            self._reasons.append("not tried on another: it may be what brings them down")
        return GiveUp(failure.status, "; ".join(self._reasons))

    def broke(self) -> None:
        """The backend failed after the client had part of the answer: nothing can move now."""
        self._report(ok=False)
        self._end(Outcome.FAILED)

    def ended(self, status: int) -> None:
        """The answer reached its end (a 5xx relayed as the backend said it is a failure)."""
        self._end(Outcome.COMPLETED if status < 500 else Outcome.FAILED)

    def rejected(self) -> None:
        """The request cannot be put to this backend at all (its dialect cannot say it)."""
        self._end(Outcome.REJECTED)

    def left(self) -> None:
        """The client went away: the backend's slot frees (closing upstream stops the work)."""
        self._scheduler.cancel(self._ticket)
        self._changed()

    def _end(self, outcome: Outcome) -> None:
        self._scheduler.release(self._ticket, outcome)
        self._changed()

    def _report(self, *, ok: bool) -> None:
        if self._scheduler.report(self.backend, ok):
            self._changed()
