"""Keys and limits, sans-I/O: the clocks are passed in."""

from __future__ import annotations

import datetime

import pytest

from parallama.errors import ConfigError
from parallama.teams.keys import (
    ApiKey,
    Budget,
    hash_key,
    key_fields,
    key_id_of,
    make_key,
    matches,
    parse_age,
    parse_expiry,
    period_end,
    period_start,
)
from parallama.teams.limits import Limits, RateLimited, duration

# Wednesday 2026-11-25 12:00 UTC
NOON = datetime.datetime(2026, 11, 25, 12, tzinfo=datetime.UTC).timestamp()


def key(**limits: object) -> ApiKey:
    return make_key("team", limits, NOON)[1]


def test_a_key_is_recognisable_random_and_stored_only_as_a_hash() -> None:
    secret, stored = make_key("alice", {}, NOON)
    other, _ = make_key("alice", {}, NOON)
    assert secret.startswith("pk-") and secret != other
    assert len(secret.split("-", 2)[2]) == 32  # 192 random bits in URL-safe base64
    assert key_id_of(secret) == stored.key_id
    assert stored.key_hash == hash_key(secret) and secret not in repr(stored)
    assert matches(secret, stored)
    assert not matches(other, stored)
    assert key_id_of("sk-openai-style") is None


def test_key_fields_check_what_they_are_given() -> None:
    fields = key_fields({"rpm": "60", "models": "llama3*, qwen2.5:*", "budget": "1000/week"})
    assert fields == {
        "rpm": 60,
        "models": ("llama3*", "qwen2.5:*"),
        "budget": Budget(1000, "week"),
    }
    assert key_fields({"rpm": "none", "expires": "none"}) == {"rpm": None, "expires_at": None}
    for bad in ({"rpm": "-1"}, {"tpm": "lots"}, {"priority": "101"}, {"budget": "10/year"}):
        with pytest.raises(ConfigError):
            key_fields(bad)
    with pytest.raises(ConfigError):
        make_key("no spaces", {}, NOON)


def test_models_are_matched_by_pattern() -> None:
    limited = key(models="llama3*,qwen2.5:7b")
    assert limited.may_use("llama3.2:3b") and limited.may_use("qwen2.5:7b")
    assert not limited.may_use("qwen2.5:14b")
    assert key().may_use("anything")


def test_expiry_and_periods_are_utc_calendar() -> None:
    assert parse_expiry("2026-11-25") == NOON + 12 * 3600  # through that day
    assert key(expires="2026-11-25").usable(NOON)
    assert not key(expires="2026-11-24").usable(NOON)
    assert period_start("day", NOON) == NOON - 12 * 3600
    assert period_start("week", NOON) == NOON - 12 * 3600 - 2 * 86400  # Monday
    assert (
        period_end("month", NOON) == datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp()
    )
    assert parse_age("7d") == 7 * 86400 and parse_age("30m") == 1800


def test_requests_per_minute_is_exact_and_says_when_there_is_room() -> None:
    limits, team = Limits(), key(rpm=3)
    for second in range(3):
        headers = dict(limits.admit(team, 100.0 + second, NOON))
        limits.finish(team, 0, 100.5 + second, NOON)
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    with pytest.raises(RateLimited) as refused:
        limits.admit(team, 110.0, NOON)
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "50"  # the first leaves the window at 160
    limits.admit(team, 160.0, NOON)  # and then there is room for one


def test_tokens_per_minute_overshoot_by_the_answers_in_flight_then_wait() -> None:
    limits, team = Limits(), key(tpm=100, max_concurrent=2)
    limits.admit(team, 0.0, NOON)
    limits.admit(team, 1.0, NOON)  # both started under the limit
    limits.finish(team, 80, 10.0, NOON)
    limits.finish(team, 80, 20.0, NOON)  # 160 of 100: the overshoot the README states
    with pytest.raises(RateLimited) as refused:
        limits.admit(team, 30.0, NOON)
    # Under 100 again once the first answer's 80 leave the window at 70 s.
    assert refused.value.headers["Retry-After"] == "40"
    assert dict(refused.value.rate_headers)[b"x-ratelimit-remaining-tokens"] == b"0"
    assert dict(limits.admit(team, 70.5, NOON))[b"x-ratelimit-remaining-tokens"] == b"20"


def test_concurrent_requests_are_counted_until_they_end() -> None:
    limits, team = Limits(), key(max_concurrent=1)
    limits.admit(team, 0.0, NOON)
    with pytest.raises(RateLimited) as refused:
        limits.admit(team, 0.1, NOON)
    assert refused.value.limit == "concurrent"
    limits.finish(team, 5, 1.0, NOON)
    limits.admit(team, 1.1, NOON)


def test_a_budget_lasts_its_period_and_renews_with_the_next() -> None:
    limits, team = Limits(), key(budget="50/day")
    limits.admit(team, 0.0, NOON)
    limits.finish(team, 60, 1.0, NOON)
    with pytest.raises(RateLimited) as refused:
        limits.admit(team, 2.0, NOON)
    assert refused.value.headers["Retry-After"] == str(12 * 3600)  # midnight UTC
    limits.admit(team, 3.0, NOON + 12 * 3600)  # a new day
    # What the ledger says was used (other gateways too) replaces the local count.
    limits.set_budget_used("team", 50, period_start("day", NOON + 12 * 3600))
    with pytest.raises(RateLimited):
        limits.admit(team, 4.0, NOON + 12 * 3600)


def test_durations_read_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0.02, 1.5, 59.96, 360, 3723)] == [
        "20ms", "1.5s", "60s", "6m0s", "1h2m3s"
    ]  # fmt: skip


def test_none_lifts_a_keys_models_too() -> None:
    assert key_fields({"models": "none"}) == {"models": ()}


def test_when_several_limits_are_reached_the_longest_wait_is_the_answer() -> None:
    limits, team = Limits(), key(rpm=1, max_concurrent=1)
    limits.admit(team, 0.0, NOON)
    with pytest.raises(RateLimited) as refused:
        limits.admit(team, 1.0, NOON)  # one running, and one a minute allowed
    assert refused.value.limit == "requests"
    assert refused.value.headers["Retry-After"] == "59"
    assert dict(refused.value.rate_headers)[b"x-ratelimit-remaining-requests"] == b"0"
