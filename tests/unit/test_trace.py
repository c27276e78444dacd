"""A request's trace context: continued from the caller's, or begun at the sample rate."""

from __future__ import annotations

import random

from parallama.core.trace import begin

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_sampled_caller_is_continued_and_an_unsampled_one_is_respected() -> None:
    chance = random.Random(0)
    trace = begin(CALLER, 0.0, chance)  # the caller decided, whatever the rate
    assert trace is not None
    assert (trace.trace_id, trace.parent_id) == (CALLER[3:35], CALLER[36:52])
    assert begin(CALLER[:-2] + "00", 1.0, chance) is None


def test_a_malformed_or_all_zero_traceparent_starts_a_trace_of_its_own() -> None:
    chance = random.Random(0)
    for bad in ("garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", CALLER.upper() + "x"):
        trace = begin(bad, 1.0, chance)
        assert trace is not None and trace.parent_id == ""
        assert len(trace.trace_id) == 32 and trace.trace_id != "0" * 32


def test_the_sample_rate_decides_for_requests_without_a_caller() -> None:
    chance = random.Random(7)
    traced = sum(begin(None, 0.25, chance) is not None for _ in range(4000))
    assert 850 < traced < 1150
    assert begin(None, 0.0, chance) is None
