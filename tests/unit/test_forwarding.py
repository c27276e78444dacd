"""One request's attempts at the backends, decided without sockets: failover, throttling, the
breakers, and the one outcome."""

from __future__ import annotations

from parallama.core.breaker import Breaker
from parallama.core.forwarding import Failure, Forwarding, GiveUp
from parallama.core.scheduler import Backend, Outcome, Scheduler
from tests.unit.test_gateway_scheduler import FakeClock, M, adds_up, make


def fleet(*names: str, threshold: int = 3) -> Scheduler:
    backends = [Backend(n, slots=2, breaker=Breaker(threshold, 10.0)) for n in names]
    return make(*backends, clock=FakeClock())


def drop(backend: str) -> Failure:
    return Failure(502, f"backend {backend} dropped it", worked_on=True)


def test_busy_and_missing_answers_move_the_request_and_busy_halves_the_slots() -> None:
    s = fleet("a", "b")
    ticket = s.submit(M)
    forwarding = Forwarding(s, ticket, retries=2)
    first = forwarding.backend
    elsewhere = forwarding.answered(503)
    assert elsewhere == Failure(503, f"backend {first} answered 503", broken=False)
    assert s.backends[first].capacity == 1  # halved for busy_seconds
    assert forwarding.failed(elsewhere) is None  # requeued, and bound to the other at once
    assert forwarding.backend != first
    assert forwarding.answered(404) is None  # the last one: its answer goes to the client
    forwarding.ended(404)
    assert ticket.outcome is Outcome.COMPLETED
    assert s.backends[first].breaker.failures == 0  # refusing is not failing
    assert adds_up(s)


def test_retries_bound_the_moves_and_the_client_hears_every_reason() -> None:
    s = fleet("a", "b", "c")
    ticket = s.submit(M)
    forwarding = Forwarding(s, ticket, retries=1)
    first = forwarding.backend
    refused = Failure(502, f"backend {first} could not be reached: refused")
    assert forwarding.failed(refused) is None
    second = forwarding.backend
    given_up = forwarding.failed(Failure(504, f"backend {second} was silent", worked_on=True))
    assert given_up == GiveUp(
        504, f"backend {first} could not be reached: refused; backend {second} was silent"
    )
    assert ticket.outcome is Outcome.FAILED
    assert {s.backends[n].breaker.failures for n in (first, second)} == {1}
    assert adds_up(s)


def test_a_request_that_backends_may_have_worked_on_moves_once_only() -> None:
    s = fleet("a", "b", "c")
    ticket = s.submit(M)
    forwarding = Forwarding(s, ticket, retries=5)
    assert forwarding.failed(drop(forwarding.backend)) is None
    given_up = forwarding.failed(drop(forwarding.backend))
    assert isinstance(given_up, GiveUp) and given_up.status == 502
    assert given_up.message.count("dropped it") == 2
    assert given_up.message.endswith("not tried on another: it may be what brings them down")
    assert ticket.outcome is Outcome.FAILED


def test_an_answer_ends_in_one_outcome_and_feeds_the_breaker() -> None:
    s = fleet("a", threshold=1)
    done, failed, cut, gone = (s.submit(M) for _ in range(4))  # 2 slots: two wait
    Forwarding(s, done, retries=2).ended(200)
    Forwarding(s, failed, retries=2).ended(500)
    assert (done.outcome, failed.outcome) == (Outcome.COMPLETED, Outcome.FAILED)
    assert cut.backend is not None and gone.backend is not None  # bound as slots freed
    Forwarding(s, cut, retries=2).broke()  # mid-stream: nothing can move
    assert cut.outcome is Outcome.FAILED
    assert not s.backends["a"].healthy  # one failure opened it (threshold 1)
    Forwarding(s, gone, retries=2).left()
    assert gone.outcome is Outcome.CANCELLED
    assert adds_up(s)


def test_the_driver_is_told_when_requests_may_have_been_bound_or_woken() -> None:
    s = fleet("a", "b")
    ticket = s.submit(M)
    calls: list[str] = []
    forwarding = Forwarding(s, ticket, retries=2, changed=lambda: calls.append("changed"))
    forwarding.failed(drop(forwarding.backend))
    assert calls  # the requeue (and the breaker) may have bound waiters
    calls.clear()
    forwarding.ended(200)
    assert calls == ["changed"]  # its slot freed
