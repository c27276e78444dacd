"""When `parallama up` starts or stops an engine of a group."""

from __future__ import annotations

import pytest

from parallama.launch.autoscale import Autoscaler, ScalePolicy, Seen

POLICY = ScalePolicy(min=0, max=3, wait_up=2.0, sustain=5.0, idle_after=60.0, cooldown=10.0)


def busy(*names: str) -> dict[str, float | None]:
    return dict.fromkeys(names)


def test_from_zero_a_waiting_request_starts_an_engine_at_once() -> None:
    scaler = Autoscaler(POLICY)
    assert scaler.decide(Seen(0.0, 0, {}), now=0.0) is None  # nothing waits: stay at zero
    decision = scaler.decide(Seen(0.0, 1, {}, stranded=1), now=1.0)
    assert decision is not None and decision.action == "start"


def test_a_long_wait_must_last_before_another_engine_starts() -> None:
    scaler = Autoscaler(POLICY)
    running = busy("a")
    assert scaler.decide(Seen(3.0, 9, running), now=100.0) is None  # over, but just now
    assert scaler.decide(Seen(1.0, 2, running), now=103.0) is None  # a burst that drained
    assert scaler.decide(Seen(3.0, 9, running), now=104.0) is None
    decision = scaler.decide(Seen(4.0, 9, running), now=109.0)
    assert decision is not None and decision.action == "start"
    assert "waited over 2 s for 5 s" in decision.reason
    # The new engine gets its chance: not another start within the cooldown and the sustain.
    assert scaler.decide(Seen(9.0, 9, busy("a", "b")), now=115.0) is None


def test_no_other_start_while_an_engine_of_the_group_is_still_starting() -> None:
    scaler = Autoscaler(POLICY)
    loading = {"a": None}  # started, loading its model: requests wait meanwhile
    assert scaler.decide(Seen(3.0, 9, loading, starting=1), now=100.0) is None
    assert scaler.decide(Seen(9.0, 9, loading, starting=1), now=110.0) is None
    decision = scaler.decide(Seen(9.5, 9, loading), now=110.5)  # it serves: they still wait
    assert decision is not None and decision.action == "start"


def test_a_request_only_another_backend_can_take_starts_nothing_at_once() -> None:
    scaler = Autoscaler(POLICY)
    assert scaler.decide(Seen(0.1, 1, {}, stranded=0), now=0.0) is None  # another serves it
    assert scaler.decide(Seen(3.0, 1, {}, stranded=0), now=1.0) is None  # waited, not long
    decision = scaler.decide(Seen(3.0, 1, {}, stranded=0), now=6.0)
    assert decision is not None and "waited over 2 s for 5 s" in decision.reason


def test_no_more_than_max() -> None:
    scaler = Autoscaler(POLICY)
    full = busy("a", "b", "c")
    assert scaler.decide(Seen(3.0, 9, full), now=0.0) is None
    assert scaler.decide(Seen(30.0, 9, full), now=100.0) is None


def test_the_engine_idle_longest_is_stopped_down_to_min_and_never_while_requests_wait() -> None:
    scaler = Autoscaler(ScalePolicy(min=1, max=3, idle_after=60.0, cooldown=10.0))
    engines: dict[str, float | None] = {"a": 10.0, "b": 5.0, "c": None}
    assert scaler.decide(Seen(0.0, 0, engines), now=50.0) is None  # not idle long enough
    assert scaler.decide(Seen(0.5, 1, engines), now=100.0) is None  # something waits
    decision = scaler.decide(Seen(0.0, 0, engines), now=100.0)
    assert decision is not None and (decision.action, decision.instance) == ("stop", "b")
    assert scaler.decide(Seen(0.0, 0, {"a": 10.0}), now=500.0) is None  # min=1 stays


def test_fewer_than_min_starts_one_and_a_bad_policy_is_refused() -> None:
    decision = Autoscaler(ScalePolicy(min=2, max=3)).decide(Seen(0.0, 0, busy("a")), now=0.0)
    assert decision is not None and decision.action == "start"
    with pytest.raises(ValueError, match="min <= max"):
        ScalePolicy(min=3, max=2)


def test_after_a_start_that_failed_none_for_a_while_doubling_with_each_failure() -> None:
    scaler = Autoscaler(POLICY)
    waiting = Seen(0.5, 1, {}, stranded=1)
    assert scaler.decide(waiting, now=0.0) is not None
    scaler.start_failed(now=1.0)
    assert scaler.decide(waiting, now=1.5) is None  # held 1 s
    assert scaler.decide(waiting, now=2.0) is not None
    scaler.start_failed(now=3.0)
    assert scaler.decide(waiting, now=4.5) is None  # held 2 s
    assert scaler.decide(waiting, now=5.0) is not None
    scaler.start_succeeded()
    assert scaler.decide(waiting, now=5.0) is not None  # no hold once one served
