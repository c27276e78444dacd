"""One request's life in the gateway, decided without sockets: admission, failover, throttling,
the breakers, the one outcome, and the record the log and metrics report."""

from __future__ import annotations

import pytest

from parallama.core.backends import Backend
from parallama.core.breaker import Breaker
from parallama.core.exchange import Exchange
from parallama.core.lifecycle import Failure, GiveUp, Lifecycle, refuse_input
from parallama.core.scheduler import Scheduler
from parallama.core.tickets import Outcome
from parallama.errors import ApiError
from parallama.protocol.usage import Usage
from tests.clock import FakeClock
from tests.unit.schedulers import M, adds_up, make


def fleet(*names: str, threshold: int = 3, slots: int = 2, **settings: object) -> Scheduler:
    backends = [Backend(n, slots=slots, breaker=Breaker(threshold, 10.0)) for n in names]
    return make(*backends, clock=FakeClock(), **settings)


def admitted(s: Scheduler, retries: int = 2, **kwargs: object) -> Lifecycle:
    life = Lifecycle(s, Exchange("POST", "/api/chat", "addr:x", 0.0), retries, **kwargs)  # type: ignore[arg-type]
    life.admit(M, "qwen2.5:7b", client="addr:x")
    return life


def drop(backend: str) -> Failure:
    return Failure(502, f"backend {backend} dropped it", worked_on=True)


def test_busy_and_missing_answers_move_the_request_and_busy_halves_the_slots() -> None:
    s = fleet("a", "b")
    life = admitted(s)
    first = life.attempt()
    elsewhere = life.answered(503)
    assert elsewhere == Failure(503, f"backend {first} answered 503", broken=False)
    assert s.backends[first].capacity == 1  # halved for busy_seconds
    assert life.failed(elsewhere) is None  # requeued, and bound to the other at once
    second = life.attempt()
    assert second != first
    assert life.answered(404) is None  # the last one: its answer goes to the client
    life.ended(404)
    life.close(0.0)
    assert life.ticket.outcome is Outcome.COMPLETED
    assert s.backends[first].breaker.failures == 0  # refusing is not failing
    record = life.exchange
    assert (record.backend, record.status, record.outcome) == (second, 404, "completed")
    assert record.failed_over == (first,)
    assert adds_up(s)


def test_retries_bound_the_moves_and_the_client_hears_every_reason() -> None:
    s = fleet("a", "b", "c")
    life = admitted(s, retries=1)
    first = life.attempt()
    refused = Failure(502, f"backend {first} could not be reached: refused")
    assert life.failed(refused) is None
    second = life.attempt()
    given_up = life.failed(Failure(504, f"backend {second} was silent", worked_on=True))
    assert given_up == GiveUp(
        504, f"backend {first} could not be reached: refused; backend {second} was silent"
    )
    assert life.ticket.outcome is Outcome.FAILED
    assert {s.backends[n].breaker.failures for n in (first, second)} == {1}
    assert (life.exchange.status, life.exchange.error) == (504, f"backend {second} was silent")
    assert adds_up(s)


def test_a_request_that_backends_may_have_worked_on_moves_once_only() -> None:
    s = fleet("a", "b", "c")
    life = admitted(s, retries=5)
    assert life.failed(drop(life.attempt())) is None
    given_up = life.failed(drop(life.attempt()))
    assert isinstance(given_up, GiveUp) and given_up.status == 502
    assert given_up.message.count("dropped it") == 2
    assert given_up.message.endswith("not tried on another: it may be what brings them down")
    assert life.ticket.outcome is Outcome.FAILED


def test_an_answer_ends_in_one_outcome_and_feeds_the_breaker() -> None:
    s = fleet("a", threshold=1)
    done, failed, cut, gone = (admitted(s) for _ in range(4))  # 2 slots: two wait
    done.ended(200, Usage(prompt_tokens=3, generated_tokens=5))
    failed.ended(500)
    assert (done.ticket.outcome, failed.ticket.outcome) == (Outcome.COMPLETED, Outcome.FAILED)
    assert done.exchange.usage == Usage(prompt_tokens=3, generated_tokens=5)
    assert not cut.waiting and not gone.waiting  # bound as slots freed
    cut.attempt()
    cut.first_byte(1.5)
    cut.broke("backend a closed the connection")  # mid-stream: nothing can move
    assert cut.ticket.outcome is Outcome.FAILED
    assert cut.exchange.first_byte_at == 1.5
    assert not s.backends["a"].healthy  # one failure opened it (threshold 1)
    gone.left()
    gone.close(0.0)
    assert (gone.ticket.outcome, gone.exchange.status) == (Outcome.CANCELLED, 499)
    assert adds_up(s)


def test_admission_refusals_are_the_clients_errors_and_count_as_rejected() -> None:
    s = fleet("a", slots=1, max_queue_per_model=1)
    s.set_inventory("a", [M])
    admitted(s)  # bound
    admitted(s)  # waits
    full = Lifecycle(s, Exchange("POST", "/api/chat", "addr:x", 0.0), 2)
    with pytest.raises(ApiError) as refused:
        full.admit(M, M, client="addr:x")
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"].isdigit()
    unknown = Lifecycle(s, Exchange("POST", "/api/chat", "addr:x", 0.0), 2)
    with pytest.raises(ApiError) as missing:
        unknown.admit("other:latest", "other", client="addr:x")
    assert (missing.value.status, missing.value.message) == (404, "model 'other' not found")
    bad = Exchange("POST", "/api/chat", "addr:x", 0.0)
    refuse_input(s, bad)
    assert full.exchange.outcome == unknown.exchange.outcome == bad.outcome == "rejected"
    assert s.outcomes[Outcome.REJECTED] == 3
    assert adds_up(s)


def test_a_request_that_waited_too_long_is_a_503_and_counts_its_wait() -> None:
    s = fleet("a", slots=1, queue_timeout=5.0)
    clock = s._clock
    assert isinstance(clock, FakeClock)
    admitted(s)
    late = admitted(s)
    assert late.waiting
    clock.now = 5.0
    s.tick()
    with pytest.raises(ApiError) as timed_out:
        late.attempt()
    assert timed_out.value.status == 503
    assert "timed out after 5 s waiting in the queue" in timed_out.value.message
    late.close(6.0)
    assert (late.exchange.outcome, late.exchange.queue_seconds) == ("timed_out", 5.0)


def test_the_driver_is_told_when_requests_may_have_been_bound_or_woken() -> None:
    s = fleet("a", "b")
    calls: list[str] = []
    life = admitted(s, changed=lambda: calls.append("changed"))
    life.failed(drop(life.attempt()))
    assert calls  # the requeue (and the breaker) may have bound waiters
    calls.clear()
    life.ended(200)
    assert calls == ["changed"]  # its slot freed
