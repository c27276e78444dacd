"""One request in the gateway, from its admission to its one outcome (sans-I/O).

What happens to a request must be decided alike by the gateway (over sockets) and by
`parallama plan` (on a virtual clock), or the planner predicts another system than the one that
runs. So both drive this with what happened, and it decides, on the scheduler: admit or refuse,
throttle a backend that said "server busy", feed the breakers, move the request to another
backend, or end it with one outcome and the error the client gets. Every update of the request's
record (`Exchange`: what the access log and the metrics report of it) is made here too; the
drivers do the I/O and nothing else:

    life = Lifecycle(scheduler, exchange, retries, changed)
    life.admit(model, requested, client=..., priority=..., session=...)  # ApiError: refused
    try:
        while True:
            ... wait while `life.waiting` ...
            backend = life.attempt()  # ApiError: it timed out in the queue
            ... send the request to `backend`; its answer's status comes back ...
            failure = life.answered(status)  # or, if the attempt failed, a `Failure`
            if failure is not None:
                given_up = life.failed(failure)  # None: it waits for another backend
                ...
            ... relay the answer: life.first_byte(now), then life.ended(status, usage), or
            life.broke(reason) if the backend fails after the client had part of it ...
    finally:
        life.close(now)  # a request that did not end was cancelled: the client left

A request moves to another backend at most `retries` times; and at most once after a backend
may have worked on it (it had the whole request and dropped it, or fell silent), so that a prompt
that crashes engines cannot take the fleet down one engine after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parallama.core.exchange import Exchange
from parallama.core.prefixes import Blocks
from parallama.core.scheduler import Scheduler
from parallama.core.tickets import (
    DeadlineError,
    NoBackendError,
    Outcome,
    QueueFullError,
    Ticket,
    UnavailableError,
)
from parallama.errors import ApiError
from parallama.protocol.ollama import model_not_found
from parallama.protocol.usage import Usage

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


def refuse_input(scheduler: Scheduler, exchange: Exchange) -> None:
    """A request turned away before it could be queued (bad input): rejected."""
    scheduler.refuse()
    exchange.outcome = Outcome.REJECTED.value


class Lifecycle:
    def __init__(
        self,
        scheduler: Scheduler,
        exchange: Exchange,
        retries: int,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`changed` is called whenever a scheduler call may have bound or woken a request
        (the driver's cue to wake its waiters)."""
        self._scheduler = scheduler
        self.exchange = exchange
        self._retries = retries
        self._changed = changed
        self._ticket: Ticket | None = None
        self._worked_on = 0
        self._reasons: list[str] = []

    @property
    def ticket(self) -> Ticket:
        assert self._ticket is not None, "admit the request first"
        return self._ticket

    @property
    def waiting(self) -> bool:
        """In the queue: the driver waits until the scheduler binds it (or times it out)."""
        return self.ticket.queued

    @property
    def backend(self) -> str:
        """The backend of the current attempt."""
        backend = self.ticket.backend
        assert backend is not None
        return backend.name

    def admit(
        self,
        model: str,
        requested: str,
        *,
        client: str,
        priority: int = 0,
        weight: float = 1.0,
        session: str = "",
        prefix: Blocks = (),
        deadline: float | None = None,
        size: int = 0,
    ) -> None:
        """Into the gateway's queue, or bound at once to a backend with a free slot; else an
        `ApiError`: 503 with Retry-After (the queue is full, no backend is healthy, or the wait
        expected is longer than the request's `deadline`), or 404 (no backend has `requested`,
        the model name as the client wrote it)."""
        scheduler, exchange = self._scheduler, self.exchange
        exchange.model, exchange.client = model, client
        try:
            self._ticket = scheduler.submit(
                model,
                client=client,
                priority=priority,
                session=session,
                prefix=prefix,
                weight=weight,
                deadline=deadline,
                size=size,
            )
        except (QueueFullError, UnavailableError, DeadlineError) as refused:
            exchange.outcome = Outcome.REJECTED.value
            retry = str(int(refused.retry_after))
            message = f"{refused}: try again in {retry} s"
            raise ApiError(503, message, {"Retry-After": retry}) from None
        except NoBackendError:
            exchange.outcome = Outcome.REJECTED.value
            raise ApiError(404, model_not_found(requested)) from None

    def attempt(self) -> str:
        """The backend to try now that the wait is over; 503 if the request waited longer
        than the queue allows."""
        ticket = self.ticket
        if ticket.outcome is Outcome.TIMED_OUT:
            scheduler = self._scheduler
            retry = str(int(scheduler.retry_after(ticket.model)))
            waited = scheduler.settings.queue_timeout
            message = f"timed out after {waited:g} s waiting in the queue"
            raise ApiError(503, message, {"Retry-After": retry})
        self.exchange.backend = backend = self.backend
        return backend

    def answered(self, status: int) -> Failure | None:
        """The backend's status arrived, before anything reached the client: a `Failure` if
        the request should rather go to another backend, else None (relay the answer)."""
        self.exchange.status = status
        scheduler, backend = self._scheduler, self.backend
        if status == 503:  # "server busy": alive, but give it less work for a while
            scheduler.throttle(backend)
        if status in TRY_ELSEWHERE and self._retries > 0 and scheduler.has_alternative(self.ticket):
            return Failure(status, f"backend {backend} answered {status}", broken=False)
        self._report(ok=status < 500 or status == 503)
        return None

    def failed(self, failure: Failure) -> GiveUp | None:
        """The attempt failed before a byte reached the client: None if the request is waiting
        for another backend again (requeued), else what the client is told."""
        exchange, left = self.exchange, self.backend
        exchange.error = failure.reason
        self._reasons.append(failure.reason)
        if failure.broken:
            self._report(ok=False)
        self._retries -= 1
        self._worked_on += failure.worked_on
        ticket = self.ticket
        may_move = self._retries >= 0 and ticket.outcome is None
        may_move &= self._worked_on <= WORKED_ON_ELSEWHERE
        if may_move and self._scheduler.requeue(ticket):
            exchange.failed_over += (left,)
            self._changed()
            return None
        self._end(Outcome.FAILED)
        if self._worked_on > WORKED_ON_ELSEWHERE:
            self._reasons.append("not tried on another: it may be what brings them down")
        exchange.status = failure.status
        return GiveUp(failure.status, "; ".join(self._reasons))

    def first_byte(self, now: float) -> None:
        """The first bytes of a streamed answer went to the client: nothing can move now."""
        self.exchange.first_byte_at = now

    def broke(self, reason: str) -> None:
        """The backend failed after the client had part of the answer."""
        self.exchange.error = reason
        self._report(ok=False)
        self._end(Outcome.FAILED)

    def ended(self, status: int, usage: Usage | None = None) -> None:
        """The answer reached its end (a 5xx relayed as the backend said it is a failure)."""
        exchange = self.exchange
        exchange.status = status
        if status == 200:
            exchange.usage = usage
        tokens = exchange.usage.generated_tokens if exchange.usage is not None else None
        self._end(Outcome.COMPLETED if status < 500 else Outcome.FAILED, tokens or 0)

    def rejected(self) -> None:
        """The request cannot be put to this backend at all (its dialect cannot say it)."""
        self._end(Outcome.REJECTED)

    def left(self) -> None:
        """The client went away mid-answer (499, as nginx logs it): the backend's slot frees
        (closing the upstream connection stops the work)."""
        self.exchange.status = 499
        self._scheduler.cancel(self.ticket)
        self._changed()

    def close(self, now: float) -> None:
        """The request is over for the driver, however it ended: one that did not end was
        cancelled (the client left while it waited, or an error escaped)."""
        ticket = self._ticket
        if ticket is None:
            return
        if ticket.outcome is None:
            self._scheduler.cancel(ticket)
            self._changed()
        assert ticket.outcome is not None
        self.exchange.outcome = ticket.outcome.value
        self.exchange.queue_seconds = ticket.queue_seconds(now)

    def _end(self, outcome: Outcome, tokens: int = 0) -> None:
        self._scheduler.release(self.ticket, outcome, tokens)
        self._changed()

    def _report(self, *, ok: bool) -> None:
        if self._scheduler.report(self.backend, ok):
            self._changed()
