"""Health, failover and routing policies in the gateway's scheduler: fake clock, no sockets."""

from __future__ import annotations

from collections import Counter

import pytest

from parallama.core.backends import Backend
from parallama.core.breaker import Breaker, BreakerState
from parallama.core.router import Policy
from parallama.core.scheduler import Scheduler, SchedulerSettings
from parallama.core.tickets import NoBackendError, Outcome, Ticket, UnavailableError
from tests.clock import FakeClock
from tests.unit.schedulers import M, adds_up, make

OTHER = "llama3.2:3b"


def backend_of(ticket: Ticket) -> str:
    assert ticket.backend is not None
    return ticket.backend.name


def finish(s: Scheduler, *tickets: Ticket) -> None:
    for ticket in tickets:
        s.release(ticket)


# -- the breaker --------------------------------------------------------------------------------


def state(breaker: Breaker) -> str:
    return breaker.state.value


def test_breaker_opens_after_consecutive_failures_and_closes_after_a_trial() -> None:
    breaker = Breaker(threshold=3, cooldown=10)
    breaker.failure(0)
    breaker.failure(1)
    breaker.success()  # not consecutive any more
    breaker.failure(2)
    breaker.failure(3)
    assert state(breaker) == "closed"
    breaker.failure(4)
    assert (breaker.state, breaker.next_change(), breaker.trips) == (BreakerState.OPEN, 14, 1)
    breaker.poll(13.9)
    assert state(breaker) == "open"
    breaker.poll(14)
    assert state(breaker) == "half-open"
    breaker.failure(15)  # the trial failed: another full cooldown
    assert (breaker.state, breaker.next_change(), breaker.trips) == (BreakerState.OPEN, 25, 2)
    breaker.poll(25)
    breaker.success()
    assert state(breaker) == "closed"


def test_an_open_backend_gets_no_work_and_a_half_open_one_gets_one_trial_at_a_time() -> None:
    clock = FakeClock()
    s = make(Backend("a", slots=4, breaker=Breaker(2, 10)), Backend("b", slots=4), clock=clock)
    s.report("a", False)
    s.report("a", False)
    assert not s.backends["a"].healthy
    first = [s.submit(M) for _ in range(4)]
    assert {backend_of(t) for t in first} == {"b"}
    clock.now = 10
    s.tick()  # cooldown over: half-open
    trials = [s.submit(M) for _ in range(2)]
    assert [backend_of(trials[0]), trials[1].queued] == ["a", True]
    s.report("a", True)  # the trial answered: closed, full capacity again
    assert backend_of(trials[1]) == "a"
    assert s.backends["a"].breaker.state is BreakerState.CLOSED
    assert adds_up(s)


def test_when_every_backend_for_a_model_is_open_requests_are_refused_with_retry_after() -> None:
    clock = FakeClock()
    s = make(Backend("a", breaker=Breaker(1, 30)), clock=clock)
    clock.now = 5
    s.report("a", False)
    clock.now = 12
    with pytest.raises(UnavailableError) as refused:
        s.submit(M)
    assert refused.value.retry_after == 23
    assert "no healthy backend serves model" in str(refused.value)
    assert s.outcomes[Outcome.REJECTED] == 1
    assert s.next_wakeup() == 35  # when the breaker goes half-open


# -- failover, throttling, draining, inventory --------------------------------------------------


def test_requeue_never_returns_to_a_backend_it_failed_on_and_fails_when_none_is_left() -> None:
    s = make(Backend("a"), Backend("b"))
    ticket = s.submit(M)
    first = backend_of(ticket)
    assert s.requeue(ticket)
    second = backend_of(ticket)
    assert second != first
    assert not s.requeue(ticket)
    assert ticket.outcome is Outcome.FAILED
    assert adds_up(s)


def test_a_draining_backend_is_no_alternative_for_failover() -> None:
    s = make(Backend("a"), Backend("b"))
    ticket = s.submit(M)
    s.set_draining("b" if backend_of(ticket) == "a" else "a", True)
    assert not s.has_alternative(ticket)
    assert not s.requeue(ticket)  # failed at once, rather than waiting for a slot never given
    assert ticket.outcome is Outcome.FAILED
    assert adds_up(s)


def test_server_busy_halves_capacity_for_a_while() -> None:
    clock = FakeClock()
    s = make(Backend("a", slots=4), clock=clock, busy_seconds=30)
    s.throttle("a")
    running = [s.submit(M) for _ in range(3)]
    assert [t.queued for t in running] == [False, False, True]
    assert s.next_wakeup() == 30
    clock.now = 30
    s.tick()
    assert not running[2].queued
    assert s.backends["a"].capacity == 4


def test_draining_backend_finishes_its_work_but_gets_none_new() -> None:
    s = make(Backend("a"), Backend("b"))
    on_a = s.submit(M)
    assert backend_of(on_a) == "a"
    s.set_draining("a", True)
    s.release(on_a)
    assert {backend_of(s.submit(M))} == {"b"}
    assert s.submit(M).queued  # b is busy; a takes nothing new
    s.remove_backend("a")
    assert "a" not in s.backends
    assert adds_up(s)


def test_inventory_routes_each_model_only_where_it_is_installed() -> None:
    s = make(Backend("a"), Backend("b"))
    s.set_inventory("a", [M])
    s.set_inventory("b", [OTHER])
    assert backend_of(s.submit(M)) == "a"
    assert backend_of(s.submit(OTHER)) == "b"
    with pytest.raises(NoBackendError):
        s.submit("missing:1b")
    s.set_inventory("b", None)  # unknown again (it stopped answering /api/tags): anything goes
    assert backend_of(s.submit("missing:1b")) == "b"


# -- routing policies ---------------------------------------------------------------------------


def policy_scheduler(policy: Policy, *backends: Backend) -> Scheduler:
    return make(*backends, routing=policy)


def test_round_robin_takes_turns_among_free_backends() -> None:
    s = policy_scheduler("round-robin", *(Backend(n, slots=8) for n in "abc"))
    order = []
    for _ in range(6):
        ticket = s.submit(M)
        order.append(backend_of(ticket))
        s.release(ticket)
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_weighted_spreads_by_weight_smoothly() -> None:
    s = policy_scheduler("weighted", Backend("x", slots=99, weight=3), Backend("y", slots=99))
    order = []
    for _ in range(8):
        ticket = s.submit(M)
        order.append(backend_of(ticket))
        s.release(ticket)
    assert Counter(order) == {"x": 6, "y": 2}
    assert "x,x,x,x" not in ",".join(order)  # interleaved, not in blocks


def test_per_model_policy_overrides_the_default() -> None:
    settings = SchedulerSettings(routing="least-loaded", routing_by_model={M: "round-robin"})
    s = Scheduler(settings, FakeClock())
    for name in "ab":
        s.add_backend(Backend(name, slots=4))
    assert (s.policy(M), s.policy(OTHER)) == ("round-robin", "least-loaded")


def test_model_affinity_waits_for_a_warm_backend_under_light_load_and_spreads_under_heavy() -> None:
    s = policy_scheduler("model-affinity", Backend("a", slots=2), Backend("b", slots=2))
    s.set_loaded("a", [M])
    light = [s.submit(M) for _ in range(4)]
    # Two run on a; two wait for a rather than load the model on b (waiting <= a's 2 slots).
    assert [backend_of(t) for t in light[:2]] == ["a", "a"]
    assert all(t.queued for t in light[2:])
    third_waiting = s.submit(M)  # three waiting > two warm slots: b loads the model
    assert backend_of(light[2]) == "b"
    assert [light[3].queued, third_waiting.queued] == [False, True]
    assert backend_of(light[3]) == "b"
    finish(s, light[0])
    assert backend_of(third_waiting) == "a"


def test_model_affinity_puts_a_new_model_where_fewest_models_are_loaded() -> None:
    s = policy_scheduler("model-affinity", Backend("a"), Backend("b"))
    s.set_loaded("a", [OTHER, "x:1b"])
    s.set_loaded("b", ["x:1b"])
    assert backend_of(s.submit(M)) == "b"


THIRD = "mistral:7b"


def test_model_affinity_spills_only_into_room_or_in_place_of_an_idle_spare_copy() -> None:
    """Backends that keep two models each: a full one takes a spilled model only in place of
    an idle model that another backend also holds."""
    a, b, c = (Backend(n, slots=1, room=2) for n in "abc")
    s = policy_scheduler("model-affinity", a, b, c)
    s.set_loaded("a", [M, OTHER])
    s.set_loaded("b", [OTHER, THIRD])  # full
    s.set_loaded("c", [THIRD])  # room for one more
    asked = [s.submit(M) for _ in range(3)]  # one runs on a; two wait for its one slot: spill
    assert backend_of(asked[0]) == "a" and backend_of(asked[1]) == "c"  # c's room, not b
    assert asked[2].queued  # one waits for the two slots it has now
    more = [s.submit(M) for _ in range(2)]  # three wait: spill again, b is full, but its idle
    assert backend_of(asked[2]) == "b"  # OTHER and THIRD are held elsewhere too
    assert all(t.queued for t in more)
    assert adds_up(s)


def test_model_affinity_never_evicts_a_busy_model_or_the_last_copy_when_room_is_known() -> None:
    a, b = Backend("a", slots=1, room=1), Backend("b", slots=1, room=1)
    s = policy_scheduler("model-affinity", a, b)
    s.set_loaded("a", [M])
    s.set_loaded("b", [OTHER])
    other = s.submit(OTHER)  # busy on b
    first = s.submit(M)
    waiting = [s.submit(M) for _ in range(3)]  # more than a's slot: it would spill, but b's
    assert backend_of(first) == "a"  # one model is busy
    assert all(t.queued for t in waiting)
    finish(s, other)  # b's model is idle now, but the only copy of OTHER: kept
    assert all(t.queued for t in waiting)
    finish(s, first)
    assert backend_of(waiting[0]) == "a"


def test_model_affinity_places_a_new_model_in_place_of_an_idle_one_when_all_are_full() -> None:
    a, b = Backend("a", slots=1, room=1), Backend("b", slots=1, room=1)
    s = policy_scheduler("model-affinity", a, b)
    s.set_loaded("a", [M])
    s.set_loaded("b", [OTHER])
    busy = s.submit(M)
    assert backend_of(busy) == "a"
    assert backend_of(s.submit(THIRD)) == "b"  # held nowhere: b's idle model makes way
    blocked = s.submit("x:1b")  # held nowhere either, and both backends are busy: it waits
    assert blocked.queued
    s.cancel(busy)  # its client left: a's model is idle now, the waiting one takes its place
    assert backend_of(blocked) == "a"


def test_model_affinity_spills_nowhere_when_more_run_than_the_room_says() -> None:
    a = Backend("a", slots=2, room=1)
    s = policy_scheduler("model-affinity", a)
    s.set_loaded("a", [M, OTHER])  # the engine said room 1, yet runs two: nothing to spare
    running = [s.submit(M), s.submit(OTHER)]
    assert [backend_of(t) for t in running] == ["a", "a"]
    assert s.submit(THIRD).queued


def test_model_affinity_counts_warm_loads_and_never_evicts_a_warm_model() -> None:
    a, b, c = (Backend(n, slots=1, room=1) for n in "abc")
    s = policy_scheduler("model-affinity", a, b, c)
    s.set_loaded("a", [M])
    s.set_loaded("b", [OTHER])
    s.set_loaded("c", [OTHER])
    b.kept = c.kept = frozenset({OTHER})  # warm, kept on every backend that serves it
    asked = [s.submit(M) for _ in range(3)]  # two wait for a's one slot
    assert backend_of(asked[0]) == "a" and asked[1].queued  # no warm model makes way
    s.set_loaded("c", [])  # c's OTHER unloaded, and the warmer loads M there instead:
    c.loading = {M}  # M's requests may go there and wait for it
    finish(s, asked[0])
    assert {backend_of(asked[1]), backend_of(asked[2])} == {"a", "c"}
    newcomer = s.submit(THIRD)  # held nowhere: a warm model's idle copy makes way, rather
    assert backend_of(newcomer) == "b"  # than the request wait for ever


def test_model_affinity_places_a_waiting_request_as_soon_as_a_probe_finds_room() -> None:
    a, b = Backend("a", slots=1, room=1), Backend("b", slots=1, room=1)
    s = policy_scheduler("model-affinity", a, b)
    s.set_loaded("a", [OTHER])
    a.kept = frozenset({OTHER})  # warm there: it stays
    s.set_loaded("b", [M])
    asked = [s.submit(M) for _ in range(3)]  # two wait for b's one slot; a has no room
    assert backend_of(asked[0]) == "b" and asked[1].queued
    s.set_loaded("a", [])  # the engine unloaded OTHER (its keep-alive ran out): room
    assert backend_of(asked[1]) == "a"


def test_model_affinity_without_known_room_spills_where_fewest_models_are_held() -> None:
    s = policy_scheduler("model-affinity", Backend("a"), Backend("b"))
    s.set_loaded("a", [M])
    s.set_loaded("b", [OTHER, THIRD])
    asked = [s.submit(M) for _ in range(3)]  # two wait for a's one slot: the first spills
    assert [backend_of(t) for t in asked[:2]] == ["a", "b"]  # unknown room: b may load it


def test_session_affinity_keeps_a_conversation_on_one_backend_and_spreads_sessions() -> None:
    s = policy_scheduler("session-affinity", *(Backend(n, slots=4) for n in "abcd"))
    homes = {}
    for session in (f"conversation-{i}" for i in range(40)):
        seen = set()
        for _ in range(3):
            ticket = s.submit(M, session=session)
            seen.add(backend_of(ticket))
            s.release(ticket)
        assert len(seen) == 1
        homes[session] = seen.pop()
    assert set(homes.values()) == set("abcd")


def test_session_affinity_spills_to_the_next_choice_when_its_backend_is_full() -> None:
    s = policy_scheduler("session-affinity", Backend("a", slots=1), Backend("b", slots=1))
    first = s.submit(M, session="hot")
    second = s.submit(M, session="hot")
    assert {backend_of(first), backend_of(second)} == {"a", "b"}
    assert s.submit(M, session="hot").queued  # never more than a backend's slots
