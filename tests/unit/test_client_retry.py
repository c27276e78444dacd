"""The client's retry and failover decisions (sans-I/O)."""

from __future__ import annotations

import random

import pytest

from parallama.client.calls import Answer, chunk, error_of
from parallama.client.errors import ResponseError
from parallama.client.options import parse_host
from parallama.client.retry import Attempts, Endpoints, OutOfTries, RetryPolicy, parse_retry_after

A, B = "http://a:1", "http://b:1"


def attempts(endpoints: Endpoints, **policy: float) -> Attempts:
    return Attempts(endpoints, RetryPolicy(**policy), 0.0, random.Random(1))  # type: ignore[arg-type]


def test_a_failed_try_moves_on_at_once_and_backs_off_only_when_all_failed() -> None:
    tries = attempts(Endpoints([A, B]), retries=4, backoff=1.0, max_backoff=1.5)
    assert tries.next(0) == (A, 0.0)
    tries.failed(A, 0)
    assert tries.next(0) == (B, 0.0)  # another endpoint: no wait
    tries.failed(B, 0)
    url, wait = tries.next(0)
    assert url == A and 0 <= wait <= 1.0  # full jitter under the first ceiling
    tries.failed(A, 0)
    assert tries.next(0)[1] == 0.0
    tries.failed(B, 0)
    assert 0 <= tries.next(0)[1] <= 1.5  # doubled, but capped
    with pytest.raises(OutOfTries):  # 1 + 4 tries
        tries.next(0)


def test_retry_after_is_a_floor_for_the_wait() -> None:
    tries = attempts(Endpoints([A]), retries=2, backoff=0.1)
    tries.next(0)
    tries.failed(A, 0, retry_after=7, dead=False)
    assert tries.next(0) == (A, 7.0)


def test_the_deadline_ends_the_call_before_a_wait_would_pass_it() -> None:
    tries = attempts(Endpoints([A]), retries=5, deadline=3.0)
    tries.next(0)
    tries.failed(A, 0, retry_after=5, dead=False)
    with pytest.raises(OutOfTries):
        tries.next(0)


def test_calls_take_endpoints_in_turn_and_open_ones_last() -> None:
    endpoints = Endpoints([A, B], threshold=2)
    assert [endpoints.order()[0] for _ in range(4)] == [A, B, A, B]
    endpoints.failed(A, 0)
    assert endpoints.open() == []  # one failure is not yet a dead endpoint
    endpoints.failed(A, 0)
    assert endpoints.open() == [A]
    assert endpoints.order() == [B, A]
    assert endpoints.order() == [B, A]  # even when it is A's turn
    endpoints.succeeded(A)
    assert endpoints.open() == []


def test_busy_answers_do_not_open_the_breaker() -> None:
    endpoints = Endpoints([A], threshold=1)
    tries = attempts(endpoints, retries=3)
    tries.next(0)
    tries.failed(A, 0, retry_after=1, dead=False)
    assert endpoints.open() == []


def test_retry_after_and_errors_are_read_leniently() -> None:
    assert [parse_retry_after(v) for v in ("3", "0.5", "", None, "soon", "-1")] == [
        3.0,
        0.5,
        None,
        None,
        None,
        None,
    ]
    assert str(error_of(503, b'{"error": "server busy"}')) == "server busy"
    assert str(error_of(400, b'{"error": {"message": "bad", "type": "x"}}')) == "bad"
    assert error_of(502, b"Bad Gateway").status_code == 502
    with pytest.raises(ResponseError, match="backend cut"):
        chunk(b'{"error": "backend cut"}')


def test_answers_read_as_dicts_and_by_attribute() -> None:
    reply = Answer({"message": {"content": "hi", "tool_calls": [{"function": {"name": "f"}}]}})
    assert reply["message"]["content"] == reply.message.content == "hi"
    assert reply.message.tool_calls[0].function.name == "f"
    assert reply.eval_count is None  # a field of the API that this answer leaves out
    with pytest.raises(AttributeError, match="'mesage' is no field of this answer"):
        _ = reply.mesage  # a misspelt name is a mistake, not a None


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("", "http://127.0.0.1:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("example.com", "http://example.com:11434"),
        ("example.com:56789/path/", "http://example.com:56789/path"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("[::1]:56789", "http://[::1]:56789"),
    ],
)
def test_hosts_are_read_as_ollamas_own_client_reads_them(host: str | None, url: str) -> None:
    assert parse_host(host) == url
