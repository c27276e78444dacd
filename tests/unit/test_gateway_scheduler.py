"""The gateway's queueing and late-binding dispatch, with a fake clock and no sockets."""

from __future__ import annotations

import pytest

from parallama.core.backends import Backend
from parallama.core.scheduler import Scheduler
from parallama.core.tickets import (
    DeadlineError,
    NoBackendError,
    Outcome,
    QueueFullError,
    Ticket,
    UnavailableError,
)
from tests.clock import FakeClock
from tests.unit.schedulers import M, adds_up, make, names


def test_requests_wait_in_the_gateway_until_a_slot_frees() -> None:
    s = make(Backend("a"))
    first, second = s.submit(M), s.submit(M)
    assert s.take_dispatched() == [first]
    assert second.queued
    s.release(first)
    assert s.take_dispatched() == [second]
    assert adds_up(s)


def test_late_binding_sends_work_to_whichever_backend_frees_first() -> None:
    """Round-robin would have queued the third request behind the slow backend `a`."""
    a, b = Backend("a"), Backend("b")
    s = make(a, b)
    on_a, on_b, third = s.submit(M), s.submit(M), s.submit(M)
    assert sorted(names([on_a, on_b])) == ["a", "b"]
    fast = on_b if on_b.backend is b else on_a
    s.release(fast)
    assert third.backend is fast.backend


def test_least_loaded_relative_to_capacity_and_weight() -> None:
    big, small = Backend("big", slots=4), Backend("small", slots=1)
    s = make(big, small)
    tickets = [s.submit(M) for _ in range(5)]
    assert sorted(names(tickets)) == ["big"] * 4 + ["small"]
    weighted = make(Backend("x", weight=3.0, slots=4), Backend("y", weight=1.0, slots=4))
    spread = names([weighted.submit(M) for _ in range(5)])
    assert spread.count("x") == 4  # weight 3 against 1: x takes four of the five


def test_prefers_a_backend_with_the_model_loaded() -> None:
    s = make(Backend("cold"), Backend("warm"))
    s.set_loaded("warm", [M])
    assert s.submit(M).backend is s.backends["warm"]


def test_only_backends_that_serve_the_model() -> None:
    s = make(Backend("chat", models=frozenset({M})), Backend("embed", models=frozenset({"nomic"})))
    assert s.submit("nomic").backend is s.backends["embed"]
    assert s.submit(M).backend is s.backends["chat"]
    with pytest.raises(NoBackendError):
        s.submit("unknown")
    assert s.outcomes[Outcome.REJECTED] == 1
    assert adds_up(s)


def test_queue_bounds_reject_with_retry_after() -> None:
    only_m = Backend("a", models=frozenset({M, "other"}))
    s = make(only_m, max_queue_per_model=2, max_queue=3)
    s.submit(M)  # running
    s.submit(M)
    s.submit(M)
    with pytest.raises(QueueFullError) as per_model:
        s.submit(M)
    assert per_model.value.scope == f"model '{M}'"
    assert per_model.value.retry_after >= 1
    s.submit("other")  # runs at once: a free slot is never refused
    s.submit("other")  # waits: the gateway queue now holds 3
    with pytest.raises(QueueFullError) as overall:
        s.submit("other")
    assert overall.value.scope == "gateway"
    assert s.outcomes[Outcome.REJECTED] == 2
    assert adds_up(s)


def test_retry_after_follows_observed_service_time() -> None:
    clock = FakeClock()
    s = make(Backend("a"), clock=clock, max_queue_per_model=3)
    for _ in range(5):
        t = s.submit(M)
        clock.now += 10
        s.release(t)
    s.submit(M)
    for _ in range(3):
        s.submit(M)
    with pytest.raises(QueueFullError) as full:
        s.submit(M)
    assert full.value.retry_after == 30  # 3 waiting x 10 s each, one slot


def test_queue_timeout() -> None:
    clock = FakeClock()
    s = make(Backend("a"), clock=clock, queue_timeout=60)
    running, waiting = s.submit(M), s.submit(M)
    assert s.next_wakeup() == 60
    clock.now = 59.9
    s.tick()
    assert waiting.queued
    clock.now = 60
    s.tick()
    assert s.take_timed_out() == [waiting]
    assert waiting.outcome is Outcome.TIMED_OUT
    assert running.outcome is None
    assert s.next_wakeup() is None
    assert adds_up(s)


def test_a_tick_at_the_wakeup_it_named_times_out_even_where_floats_round() -> None:
    """0.3 + 60 - 60 < 0.3 in floats: a tick at exactly `next_wakeup()` must still act, or its
    driver is woken again and again at the same instant (for ever, on a virtual clock)."""
    clock = FakeClock()
    s = make(Backend("a"), clock=clock, queue_timeout=60)
    s.submit(M)
    clock.now = 0.3
    waiting = s.submit(M)
    deadline = s.next_wakeup()
    assert deadline is not None and deadline - 60 < 0.3  # the rounding this is about
    clock.now = deadline
    s.tick()
    assert s.take_timed_out() == [waiting]


def test_cancel_queued_and_in_flight() -> None:
    s = make(Backend("a"))
    running, queued, behind = s.submit(M), s.submit(M), s.submit(M)
    s.take_dispatched()
    s.cancel(queued)
    assert queued.outcome is Outcome.CANCELLED
    s.cancel(running)  # frees the slot at once
    assert s.take_dispatched() == [behind]
    assert s.accounting() == {
        "total": 3,
        "completed": 0,
        "rejected": 0,
        "timed_out": 0,
        "cancelled": 2,
        "failed": 0,
        "in_flight": 1,
        "queued": 0,
    }


def serve_in_turn(s: Scheduler, running: Ticket, count: int) -> list[Ticket]:
    """Release the running request `count` times and list who got the slot each time."""
    s.take_dispatched()
    order = []
    for _ in range(count):
        s.release(running)
        (running,) = s.take_dispatched()
        order.append(running)
    return order


def test_priority_then_arrival_order() -> None:
    s = make(Backend("a"))
    running = s.submit(M)
    low = s.submit(M, priority=0)
    high = s.submit(M, priority=5)
    later_low = s.submit(M, priority=0)
    assert serve_in_turn(s, running, 3) == [high, low, later_low]


def test_fifo_lets_one_heavy_client_starve_others_and_fair_does_not() -> None:
    for discipline, light_turn in (("fifo", 4), ("fair", 1)):
        s = make(Backend("a"), discipline=discipline)
        running = s.submit(M, client="heavy")
        heavy = [s.submit(M, client="heavy") for _ in range(4)]
        light = s.submit(M, client="light")
        order = serve_in_turn(s, running, 5)
        assert order.index(light) == light_turn, discipline
        assert [t for t in order if t is not light] == heavy  # each client's own order kept


def test_requeue_keeps_its_place_and_moves_to_another_backend() -> None:
    s = make(Backend("a"), Backend("b"))
    first = s.submit(M)
    failed_on = first.backend
    assert failed_on is not None
    assert s.requeue(first)
    assert first.backend is not None
    assert first.backend is not failed_on
    assert adds_up(s)


def test_queue_wait_sums_the_waits_and_leaves_out_the_time_on_a_failed_backend() -> None:
    clock = FakeClock()
    s = make(Backend("a"), Backend("b"), clock=clock)
    busy_a, busy_b = s.submit(M), s.submit(M)
    ticket = s.submit(M)
    clock.now = 2.0  # waits 2 s in the queue
    s.release(busy_a)
    assert ticket.backend is not None and ticket.queue_seconds(clock.now) == 2.0
    clock.now = 12.0  # 10 s on a backend that then fails before answering
    s.release(busy_b)
    assert s.requeue(ticket)  # to the other backend, which is free: no second wait
    assert ticket.backend is not None and ticket.queue_seconds(clock.now) == 2.0
    clock.now = 20.0
    assert ticket.queue_seconds(clock.now) == 2.0  # answering is not waiting


def test_queue_wait_of_a_request_that_timed_out_is_its_whole_wait() -> None:
    clock = FakeClock()
    s = make(Backend("a"), clock=clock, queue_timeout=5.0)
    s.submit(M)
    waiting = s.submit(M)
    clock.now = 5.0
    s.tick()
    assert waiting.outcome is Outcome.TIMED_OUT
    clock.now = 9.0
    assert waiting.queue_seconds(clock.now) == 5.0


def test_a_request_requeued_after_a_long_time_on_a_backend_keeps_its_queue_time() -> None:
    """It waited 1 s, then a backend held it 100 s before failing: the queue timeout (60 s)
    counts queue time, so it may wait 59 s more for the other backend, not be timed out at once."""
    clock = FakeClock()
    s = make(Backend("a"), Backend("b"), clock=clock, queue_timeout=60.0)
    busy_a, busy_b = s.submit(M), s.submit(M)
    ticket = s.submit(M)
    clock.now = 1.0
    s.release(busy_a)  # it goes to a
    clock.now = 101.0  # where it stays 100 s and fails; b is still busy
    assert s.requeue(ticket) and ticket.queued
    s.tick()
    assert ticket.outcome is None and ticket.queued
    assert s.next_wakeup() == 160.0
    clock.now = 159.9
    s.tick()
    assert ticket.queued
    clock.now = 160.0
    s.tick()
    assert ticket.outcome is Outcome.TIMED_OUT
    assert ticket.queue_seconds(clock.now) == 60.0
    assert busy_b.backend is not None


def test_fair_turns_follow_each_clients_weight() -> None:
    s = make(Backend("a"), discipline="fair")
    running = s.submit(M, client="x")
    heavy = [s.submit(M, client="gold", weight=3.0) for _ in range(9)]
    light = [s.submit(M, client="basic", weight=1.0) for _ in range(9)]
    order = serve_in_turn(s, running, 12)
    # Three of gold's for each of basic's, however many either sent.
    assert [("gold" if t in heavy else "basic") for t in order[:8]].count("gold") == 6
    assert sum(t in light for t in order) == 3
    assert [t for t in order if t in heavy] == heavy[:9]  # each client's own order kept


def test_a_client_back_from_a_pause_gets_no_saved_up_turns() -> None:
    s = make(Backend("a"), discipline="fair")
    running = s.submit(M, client="x")
    busy = [s.submit(M, client="busy") for _ in range(6)]
    order = serve_in_turn(s, running, 3)  # only busy waits: it takes the turns
    assert order == busy[:3]
    late = [s.submit(M, client="late") for _ in range(3)]
    order = serve_in_turn(s, order[-1], 4)
    # The newcomer alternates with busy from now: it is not owed the turns it was away, and
    # takes none ahead of busy's, which was due.
    assert order == [busy[3], late[0], busy[4], late[1]]


def test_a_cancelled_clients_turn_goes_to_the_next() -> None:
    s = make(Backend("a"), discipline="fair")
    running = s.submit(M, client="x")
    gone = s.submit(M, client="gone")
    staying = [s.submit(M, client="stays") for _ in range(2)]
    s.cancel(gone)
    assert serve_in_turn(s, running, 2) == staying
    assert adds_up(s)


def test_clients_that_come_and_go_are_not_remembered_without_bound() -> None:
    s = make(Backend("a"), discipline="fair")
    running = s.submit(M, client="x")
    staying = s.submit(M, client="stays")  # one client always waiting
    for n in range(10_000):  # each with its own X-Client-Id, leaving before its turn
        s.cancel(s.submit(M, client=f"passer-by {n}"))
    assert s._queues[M].clients <= 2 * 1 + 64 + 1
    assert serve_in_turn(s, running, 1) == [staying]


def test_a_new_client_id_per_request_neither_starves_a_waiting_client_nor_grows_the_queue() -> None:
    """Fresh clients all started at the turn last taken, and taking it moved no clock: one
    that had been served once waited for as long as new ids came, and each id was kept."""
    s = make(Backend("a"), discipline="fair")
    running = s.submit(M, client="x")
    served = s.submit(M, client="regular")
    s.submit(M, client="id first")  # the queue is never empty from here on
    (running,) = serve_in_turn(s, running, 1)
    assert running is served
    waiting = s.submit(M, client="regular")  # its next turn is one stride on
    order = []
    for n in range(2_000):  # a new X-Client-Id with every request
        s.submit(M, client=f"id {n}")
        s.release(running)
        (running,) = s.take_dispatched()
        order.append(running)
        if running is waiting:
            break
    assert waiting in order[:3]
    assert s._queues[M].clients <= 2 * 2 + 64 + 1


def test_shared_slots_bind_only_on_a_lease_and_give_it_back_when_done() -> None:
    s = make(Backend("a", slots=2), Backend("b", slots=2), shared_slots=True)
    first = s.submit(M)
    assert first.queued  # free slots, but none leased by this gateway
    assert s.wanted() == {M: 1}
    assert [b.name for b in s.candidates(M)] == ["a", "b"]
    s.grant("b", M)
    assert first.backend is not None and first.backend.name == "b"
    assert s.wanted() == {}
    s.release(first)
    assert s.take_returned() == [("b", M)]  # the lease goes back with the slot
    assert adds_up(s)


def test_a_lease_nobody_takes_is_given_back_at_once() -> None:
    s = make(Backend("a"), shared_slots=True)
    gone = s.submit(M)
    s.cancel(gone)  # left while its lease was being acquired
    s.grant("a", M)
    assert s.take_returned() == [("a", M)]
    assert s.backends["a"].active == 0


def test_a_lease_is_not_asked_of_the_backend_the_request_failed_on() -> None:
    s = make(Backend("a"), Backend("b"), shared_slots=True)
    ticket = s.submit(M)
    s.grant("a", M)
    assert s.requeue(ticket)
    assert s.take_returned() == [("a", M)]
    assert [b.name for b in s.candidates(M)] == ["b"]


def test_a_lease_granted_for_a_client_binds_that_clients_next_request() -> None:
    """Fair across gateways: Redis decides whose turn it is among the clients offered."""
    s = make(Backend("a", slots=4), discipline="fair", shared_slots=True)
    x1, x2, y1 = s.submit(M, client="x"), s.submit(M, client="x"), s.submit(M, client="y")
    assert [t.client for t in s.next_clients(M, 16)] == ["x", "y"]
    s.grant("a", M, client="y")
    assert y1.backend is not None and x1.queued
    s.grant("a", M, client="gone")  # left meanwhile: the local order decides
    assert x1.backend is not None and x2.queued
    assert s.next_clients(M, 16) == [x2]


def test_the_next_tickets_are_those_leases_would_go_to_in_order() -> None:
    s = make(Backend("a"), shared_slots=True)
    low, high, later = s.submit(M), s.submit(M, priority=5), s.submit(M)
    assert s.next_tickets(M, 2) == [high, low]
    assert s.next_tickets(M, 9) == [high, low, later]


def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once() -> None:
    clock = FakeClock()
    s = make(Backend("a", slots=2), clock=clock)
    timed = [s.submit(M), s.submit(M)]
    clock.now = 4.0
    for ticket in timed:
        s.release(ticket)  # answers take 4 s: the model's service time
    running = [s.submit(M), s.submit(M)]  # the two slots busy again
    assert s.expected_wait(M) == 2.0  # the next slot frees in 4 s / 2 slots on average
    waiting = s.submit(M, deadline=2.5)  # fits: it queues
    assert waiting.queued and s.expected_wait(M) == 4.0
    with pytest.raises(DeadlineError, match=r"expected wait of 4\.0 s exceeds .* deadline of 3 s"):
        s.submit(M, deadline=3)
    assert s.outcomes[Outcome.REJECTED] == 1 and adds_up(s)
    s.release(running[0])
    assert waiting.backend is not None


def test_a_deadline_is_not_held_against_a_request_that_binds_at_once() -> None:
    clock = FakeClock()
    s = make(Backend("a", slots=1), clock=clock)
    first = s.submit(M)
    clock.now = 60.0
    s.release(first)  # one answer took a minute
    assert s.submit(M, deadline=0.5).backend is not None  # a free slot: no wait at all


def test_a_request_waits_for_a_standby_engine_rather_than_failing() -> None:
    """An autoscaled engine that is stopped is started when work waits: its requests queue
    (and bind when it comes online) where a backend merely down would refuse them at once."""
    down, standby = Backend("down", online=False), Backend("standby", online=False)
    with pytest.raises(UnavailableError):
        make(down).submit(M)
    s = make(down, standby)
    s.set_standby("standby", True)
    waiting = s.submit(M)
    assert waiting.queued and s.take_dispatched() == []
    s.set_online("standby", True)
    assert s.take_dispatched() == [waiting] and waiting.backend is standby
    s.set_standby("standby", False)
    s.set_online("standby", False)
    with pytest.raises(UnavailableError):
        s.submit(M)
    assert adds_up(s)


def test_a_deadline_does_not_refuse_a_request_that_waits_for_an_engine_to_start() -> None:
    """How long a start takes is not known: no evidence against the deadline (it would be
    refused for ever, as nothing would ever start)."""
    s = make(Backend("standby", online=False), queue_timeout=60)
    s.set_standby("standby", True)
    assert s.submit(M, deadline=5).queued


def test_the_queue_holds_bodies_up_to_its_bytes_not_only_its_count() -> None:
    """A thousand 16 MiB bodies waiting were 16 GiB held: the count alone bounded nothing."""
    s = make(Backend("a"), max_queue_bytes=10_000)
    running = s.submit(M, size=9_000)  # bound at once: it waits for nothing
    waiting = s.submit(M, size=6_000)
    with pytest.raises(QueueFullError, match="bytes"):
        s.submit(M, size=6_000)
    s.cancel(waiting)
    again = s.submit(M, size=6_000)
    assert again.queued and running.backend is not None
    assert adds_up(s)
