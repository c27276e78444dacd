"""Ollama's scheduling rules on the sans-I/O scheduler, driven by a fake clock."""

from __future__ import annotations

import math

import pytest

from parallama.sim.scheduler import (
    Admission,
    AdmissionState,
    EvictionPolicy,
    OllamaScheduler,
    OllamaSettings,
    ServerBusyError,
)
from tests.clock import FakeClock

LOAD = 2.0


def make(
    clock: FakeClock,
    *,
    num_parallel: int = 1,
    max_queue: int = 512,
    max_loaded_models: int = 3,
    keep_alive: float = 300.0,
    eviction: EvictionPolicy = "ollama",
) -> OllamaScheduler:
    settings = OllamaSettings(
        num_parallel=num_parallel,
        max_queue=max_queue,
        max_loaded_models=max_loaded_models,
        default_keep_alive=keep_alive,
        eviction=eviction,
    )
    return OllamaScheduler(settings, clock, load_seconds=lambda _model: LOAD)


def state_of(ticket: Admission) -> AdmissionState:
    """Read the state afresh (mypy would otherwise keep an earlier assert's narrowing)."""
    return ticket.state


def advance(clock: FakeClock, scheduler: OllamaScheduler, to: float) -> None:
    """Move time forward, firing every wakeup the scheduler asked for on the way."""
    while (wake := scheduler.next_wakeup()) is not None and wake <= to:
        clock.now = max(clock.now, wake)
        scheduler.tick()
    clock.now = to
    scheduler.tick()


def test_first_request_waits_for_the_load_then_runs() -> None:
    clock = FakeClock()
    s = make(clock)
    ticket = s.submit("m")
    assert ticket.state is AdmissionState.SCHEDULED
    assert s.next_wakeup() == LOAD
    advance(clock, s, LOAD)
    assert s.take_started() == [ticket]
    assert ticket.ready_at == LOAD  # load_duration covers the load
    assert ticket.started_at == LOAD


def test_one_slot_runs_requests_one_at_a_time_in_order() -> None:
    clock = FakeClock()
    s = make(clock)
    first, second, third = (s.submit("m") for _ in range(3))
    advance(clock, s, LOAD)
    assert s.take_started() == [first]
    s.finish(first)
    assert s.take_started() == [second]
    s.finish(second)
    assert s.take_started() == [third]


def test_parallel_slots_run_together() -> None:
    clock = FakeClock()
    s = make(clock, num_parallel=2)
    tickets = [s.submit("m") for _ in range(3)]
    advance(clock, s, LOAD)
    assert s.take_started() == tickets[:2]
    assert s.busy_slots("m") == 2
    s.finish(tickets[1])
    assert s.take_started() == [tickets[2]]


def test_pending_queue_is_bounded_during_a_load() -> None:
    """A cold burst: the head is loading; `max_queue` more wait; the next is 'server busy'."""
    clock = FakeClock()
    s = make(clock, max_queue=2)
    s.submit("m")  # taken off the queue, loading
    s.submit("m")
    s.submit("m")
    with pytest.raises(ServerBusyError):
        s.submit("m")
    assert len(s.pending) == 2


def test_slot_wait_of_a_loaded_model_is_unbounded() -> None:
    """A warm burst: requests go straight to the runner and wait on its slots, never 503."""
    clock = FakeClock()
    s = make(clock, max_queue=2)
    s.submit("m")
    advance(clock, s, LOAD)
    for _ in range(50):
        s.submit("m")
    assert len(s.pending) == 0
    assert len(s.runners["m"].waiting) == 50


def test_head_of_line_blocking_while_another_model_loads() -> None:
    clock = FakeClock()
    s = make(clock)
    s.submit("a")
    advance(clock, s, LOAD)
    s.take_started()
    s.submit("b")  # starts loading b
    behind = s.submit("a")  # a is loaded, but the queue is blocked by b's load
    assert behind.state is AdmissionState.PENDING
    advance(clock, s, 2 * LOAD)
    # a's slot is still held by the first request
    assert state_of(behind) is AdmissionState.SCHEDULED


def test_cancel_while_pending_leaves_the_queue() -> None:
    clock = FakeClock()
    s = make(clock)
    s.submit("m")
    queued = s.submit("m")
    s.cancel(queued)
    assert queued.state is AdmissionState.CANCELLED
    assert not s.pending


def test_cancel_while_running_frees_the_slot_for_the_next() -> None:
    clock = FakeClock()
    s = make(clock)
    running, waiting = s.submit("m"), s.submit("m")
    advance(clock, s, LOAD)
    assert s.take_started() == [running]
    s.cancel(running)
    assert s.take_started() == [waiting]


def test_idle_model_unloads_after_its_keep_alive() -> None:
    clock = FakeClock()
    s = make(clock, keep_alive=60)
    ticket = s.submit("m")
    advance(clock, s, LOAD)
    s.finish(ticket)
    assert s.runners["m"].expires_at == LOAD + 60
    advance(clock, s, LOAD + 59)
    assert "m" in s.runners
    advance(clock, s, LOAD + 60)
    assert "m" not in s.runners


def test_keep_alive_zero_unloads_at_once_and_negative_never() -> None:
    clock = FakeClock()
    s = make(clock)
    now_gone = s.submit("a", keep_alive=0)
    forever = s.submit("b", keep_alive=math.inf)
    advance(clock, s, 2 * LOAD)
    s.finish(now_gone)
    s.finish(forever)
    assert list(s.runners) == ["b"]
    assert s.runners["b"].expires_at is None
    assert s.next_wakeup() is None


def test_a_new_request_cancels_the_expiry_timer() -> None:
    clock = FakeClock()
    s = make(clock, keep_alive=10)
    first = s.submit("m")
    advance(clock, s, LOAD)
    s.finish(first)
    advance(clock, s, LOAD + 5)
    second = s.submit("m")
    advance(clock, s, LOAD + 50)
    assert second.state is AdmissionState.RUNNING
    assert "m" in s.runners


@pytest.mark.parametrize(("policy", "evicted"), [("ollama", "b"), ("lru", "a")])
def test_eviction_order(policy: EvictionPolicy, evicted: str) -> None:
    """Ollama unloads the idle runner with the shortest keep-alive; LRU the least recently used."""
    clock = FakeClock()
    s = make(clock, max_loaded_models=2, eviction=policy)
    a = s.submit("a", keep_alive=3600)
    advance(clock, s, LOAD)
    s.finish(a)
    b = s.submit("b", keep_alive=600)
    advance(clock, s, 2 * LOAD)
    s.finish(b)
    s.submit("c")
    assert evicted not in s.runners
    assert "c" in s.runners
    assert s.unloads == 1


def test_eviction_drains_a_busy_runner_and_blocks_the_queue() -> None:
    clock = FakeClock()
    s = make(clock, max_loaded_models=1)
    busy = s.submit("a")
    advance(clock, s, LOAD)
    s.take_started()
    other = s.submit("b")
    assert other.state is AdmissionState.PENDING
    assert s.runners["a"].draining
    late_a = s.submit("a")  # behind b in the FIFO: waits too
    assert late_a.state is AdmissionState.PENDING
    s.finish(busy)  # a drains and unloads; b loads
    assert "a" not in s.runners
    assert s.runners["b"].state.value == "loading"
    advance(clock, s, 2 * LOAD)
    assert s.take_started() == [other]


def test_different_num_ctx_forces_a_reload() -> None:
    clock = FakeClock()
    s = make(clock)
    first = s.submit("m", num_ctx=2048)
    advance(clock, s, LOAD)
    s.finish(first)
    second = s.submit("m", num_ctx=8192)
    assert s.unloads == 1
    assert s.runners["m"].num_ctx == 8192
    advance(clock, s, 2 * LOAD)
    assert second.state is AdmissionState.RUNNING


def test_preload_needs_no_slot() -> None:
    clock = FakeClock()
    s = make(clock)
    running = s.submit("m")
    advance(clock, s, LOAD)
    s.take_started()
    preload = s.submit("m", needs_slot=False)
    assert s.take_started() == [preload]
    assert running.state is AdmissionState.RUNNING


def test_unload_request_waits_for_the_runner_to_go_idle() -> None:
    clock = FakeClock()
    s = make(clock)
    running = s.submit("m")
    advance(clock, s, LOAD)
    s.unload("m")
    assert "m" in s.runners
    s.finish(running)
    assert "m" not in s.runners


def test_cancelled_load_still_completes_then_idles() -> None:
    clock = FakeClock()
    s = make(clock, keep_alive=30)
    ticket = s.submit("m")
    s.cancel(ticket)
    advance(clock, s, LOAD)
    assert s.runners["m"].expires_at == LOAD + 30
