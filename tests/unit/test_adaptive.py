"""Slots learned from what they give: hill climbing on aggregate tokens/s, on a fake clock."""

from __future__ import annotations

from collections import Counter

import pytest

from parallama.core.adaptive import SETTLE, SlotTuner
from parallama.sim.timing import TimingModel

BEST_AT_THREE = TimingModel(prefill_tps=1000, decode_tps=100, batch_slowdown=0.3, batch_knee=3)


def run(tuner: SlotTuner, answers: int, waiting: bool = True) -> Counter[int]:
    """Answers of an engine that gives most at 3 at once, always saturated; the time spent
    at each limit."""
    spent: Counter[int] = Counter()
    now = 0.0
    for _ in range(answers):
        per_request = BEST_AT_THREE.aggregate_tps(tuner.limit) / tuner.limit
        tuner.observe(tuner.limit, per_request, now, waiting)
        spent[tuner.limit] += 1
        now += 0.5
    return spent


def test_the_limit_climbs_to_the_engines_best_and_stays_there_mostly() -> None:
    tuner = SlotTuner(low=1, high=8)
    spent = run(tuner, 2000)  # about 17 minutes of answers: it tries 4 again now and then
    assert tuner.limit == 3 or spent.most_common(1)[0][0] == 3
    assert spent[3] / sum(spent.values()) > 0.8
    assert max(spent) <= 4  # never further past the best than one step


def test_an_engine_that_scales_far_is_not_held_at_twenty() -> None:
    tuner = SlotTuner(low=1, high=64)
    now = 0.0
    for _ in range(2000):
        tuner.observe(tuner.limit, 10.0, now, waiting=True)  # each answer as fast: linear
        now += 0.5
    assert tuner.limit == 64


def test_it_learns_nothing_without_demand_and_keeps_to_its_bounds() -> None:
    idle = SlotTuner(low=2, high=8)
    run(idle, 200, waiting=False)
    assert idle.limit == 2
    capped = SlotTuner(low=1, high=2)
    run(capped, 200)
    assert capped.limit == 2
    with pytest.raises(ValueError, match="1 <= min <= max"):
        SlotTuner(low=3, high=2)


def test_after_a_step_back_it_stays_a_while_before_trying_one_more_again() -> None:
    tuner = SlotTuner(low=1, high=8)
    run(tuner, 200)  # up to 4, found no better than 3, back to 3
    assert tuner.limit == 3
    back_at = tuner.settled_until - SETTLE
    speed = BEST_AT_THREE.aggregate_tps(3) / 3
    for step in range(int(SETTLE) - 1):
        assert not tuner.observe(3, speed, back_at + step, waiting=True)
    assert tuner.observe(3, speed, back_at + SETTLE, waiting=True)
    assert tuner.limit == 4
