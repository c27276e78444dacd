"""Teams: API keys, their limits and the usage ledger, through a real gateway in front of the
emulator, against a real database of each kind (a SQLite file, a throwaway PostgreSQL server)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from parallama.bench.trace import read_trace
from parallama.cli import main
from parallama.config import BackendSettings
from parallama.launch.supervisor import free_port
from parallama.sim.server import SimServer
from parallama.teams.store import open_store
from tests.dbhelpers import Postgres, cli, new_key, postgres_pids, postgres_server
from tests.launchhelpers import sim_process
from tests.rawhelpers import RawRequest, raw_backend
from tests.redishelpers import RedisServer
from tests.simhelpers import (
    CHAT_MODEL,
    OTHER_MODEL,
    eventually,
    gateway_for,
    gateway_with,
    model_state,
    sim_server,
    state,
)

GENERATE = {"model": CHAT_MODEL, "prompt": "Why is the sky blue?", "stream": False}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(url: str, key: str, body: dict[str, Any] = GENERATE) -> httpx.Response:
    return httpx.post(f"{url}/api/generate", json=body, headers=bearer(key), timeout=30)


def ledger_rows(database: str) -> list[dict[str, Any]]:
    store = open_store(database)
    try:
        return store.usage(0.0, ["key", "outcome"])
    finally:
        store.close()


def ledger_count(database: str) -> int:
    return sum(row["requests"] for row in ledger_rows(database))


@contextlib.contextmanager
def keyed_gateway(sim: SimServer, database: str, **settings: Any) -> Iterator[str]:
    with gateway_for([sim], auth="keys", database=database, **settings) as gateway:
        yield gateway.url


def test_requests_without_a_good_key_get_401_in_each_routes_format(
    sim: SimServer, database: str
) -> None:
    good = new_key(database, "alice")
    revoked = new_key(database, "bob")
    expired = new_key(database, "carol", "--expires", "2020-01-31")
    cli("keys", "revoke", "bob", "--database", database)
    forged = good[:-4] + "AAAA"  # right id, wrong secret
    with keyed_gateway(sim, database) as url:
        refused = {
            "missing": {},
            "not bearer": {"Authorization": f"Basic {good}"},
            "malformed": bearer("sk-not-one-of-ours"),
            "forged": bearer(forged),
            "revoked": bearer(revoked),
            "expired": bearer(expired),
        }
        for case, headers in refused.items():
            ollama = httpx.post(f"{url}/api/generate", json=GENERATE, headers=headers)
            assert ollama.status_code == 401, case
            assert set(ollama.json()) == {"error"}, case
            assert ollama.headers["WWW-Authenticate"] == "Bearer"
            openai = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers=headers,
            )
            assert openai.status_code == 401, case
            assert openai.json()["error"]["code"] == "invalid_api_key", case
        assert "revoked" in httpx.post(f"{url}/api/generate", headers=bearer(revoked)).text
        assert "expired" in httpx.post(f"{url}/api/generate", headers=bearer(expired)).text
        # The listings need a key too; the gateway's own routes do not.
        assert httpx.get(f"{url}/api/tags").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=bearer(good)).status_code == 200
        assert httpx.get(f"{url}/api/version").status_code == 200
        answer = generate(url, good)
        assert answer.status_code == 200
        assert answer.json()["done"] is True


def test_both_official_clients_send_their_key_as_a_bearer(sim: SimServer, database: str) -> None:
    import ollama
    import openai

    key = new_key(database, "apps")
    with keyed_gateway(sim, database) as url:
        answer = ollama.Client(host=url, headers=bearer(key)).generate(
            model=CHAT_MODEL, prompt="hi"
        )
        assert answer.done
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key=key).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="pk-wrong").models.list()


def test_a_revoked_key_stops_working_within_a_second(sim: SimServer, database: str) -> None:
    key = new_key(database, "leaver")
    with keyed_gateway(sim, database) as url:
        assert generate(url, key).is_success
        cli("keys", "revoke", "leaver", "--database", database)
        revoked_at = time.monotonic()
        eventually(
            lambda: generate(url, key),
            lambda answer: answer.status_code == 401,
        )
        # Polled twice a second: a second is the promise (here, plus a loaded machine's slack).
        assert time.monotonic() - revoked_at < 3.0


def test_a_key_in_the_query_string_is_refused_and_not_logged(
    sim: SimServer, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key(database, "careless")
    with caplog.at_level(logging.DEBUG), keyed_gateway(sim, database) as url:
        for parameter in ("api_key", "key", "token"):
            answer = httpx.post(
                f"{url}/api/generate?{parameter}={key}", json=GENERATE, headers=bearer(key)
            )
            assert answer.status_code == 401
            assert "Authorization header" in answer.json()["error"]
    # The gateway's own lines, with all their fields (the client library logs its URLs).
    ours = [vars(r) for r in caplog.records if r.name.startswith("parallama")]
    assert any(line.get("fields", {}).get("status") == 401 for line in ours)  # logged...
    assert key[-20:] not in str(ours)  # ...without the key


def test_a_key_may_use_only_its_models(sim: SimServer, database: str) -> None:
    key = new_key(database, "qwen-only", "--models", "qwen2.5:*", "--rpm", "100")
    with keyed_gateway(sim, database) as url:
        allowed = generate(url, key)
        assert allowed.status_code == 200
        other = {**GENERATE, "model": OTHER_MODEL}
        refused = generate(url, key, other)
        assert refused.status_code == 403
        assert OTHER_MODEL in refused.json()["error"]
        # The rate-limit headers on every answer to the key, refusals and listings too.
        listed = httpx.get(f"{url}/api/tags", headers=bearer(key))
        for answer in (refused, listed):
            assert answer.headers["x-ratelimit-remaining-requests"] == "99"


async def burst(url: str, key: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        asked = (
            client.post("/api/generate", json=GENERATE, headers=bearer(key)) for _ in range(count)
        )
        return await asyncio.gather(*asked)


def test_a_burst_of_200_with_rpm_60_admits_exactly_60(sim: SimServer, database: str) -> None:
    key = new_key(database, "bursty", "--rpm", "60")
    with keyed_gateway(sim, database) as url:
        started = time.monotonic()
        answers = asyncio.run(burst(url, key, 200))
        elapsed = time.monotonic() - started
    admitted = [a for a in answers if a.status_code == 200]
    limited = [a for a in answers if a.status_code == 429]
    assert len(admitted) == 60
    assert len(limited) == 140
    for answer in limited:
        # The window frees when the first of the 60 is a minute old: within a minute of now.
        retry = int(answer.headers["Retry-After"])
        assert 60 - elapsed - 1 <= retry <= 60
        assert answer.headers["x-ratelimit-limit-requests"] == "60"
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
        assert "60 requests per minute" in answer.json()["error"]
    remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted)
    assert remaining == list(range(60))  # each admitted answer says what is left after it


def test_token_limits_count_what_answers_used(sim: SimServer, database: str) -> None:
    key = new_key(database, "wordy", "--tpm", "10")
    with keyed_gateway(sim, database) as url:
        first = generate(url, key)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "10"
        used = first.json()["prompt_eval_count"] + first.json()["eval_count"]
        assert used > 10  # one answer in flight may overshoot: it is counted when it ends
        second = generate(url, key)
        assert second.status_code == 429
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 55 <= int(second.headers["Retry-After"]) <= 60
        # OpenAI's clients read the same: RateLimitError, with the headers.
        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        assert raised.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_budget_runs_out_until_its_period_ends(sim: SimServer, database: str) -> None:
    key = new_key(database, "thrifty", "--budget", "5/day")
    with keyed_gateway(sim, database) as url:
        assert generate(url, key).is_success
        refused = generate(url, key)
    assert refused.status_code == 429
    assert "budget of 5 per day" in refused.json()["error"]
    until_midnight = 86400 - time.time() % 86400
    assert abs(int(refused.headers["Retry-After"]) - until_midnight) < 60
    # The budget is in the ledger, so a gateway started later still knows it is spent.
    with keyed_gateway(sim, database) as url:
        again = generate(url, key)
        assert again.status_code == 429


def test_max_concurrent_refuses_what_is_beyond_it(database: str) -> None:
    with sim_server(decode_tps=40.0, output_tokens=(40, 40), num_parallel=4) as slow:
        key = new_key(database, "one-at-a-time", "--max-concurrent", "1")
        with keyed_gateway(slow, database) as url:
            answers = asyncio.run(burst(url, key, 3))
    assert sorted(a.status_code for a in answers) == [200, 429, 429]
    assert "1 concurrent requests" in next(a for a in answers if a.status_code == 429).text


def test_the_ledger_has_a_row_per_finished_request_and_usage_sums_it(
    sim: SimServer, database: str
) -> None:
    alice = new_key(database, "alice", "--models", "qwen2.5:*")
    bob = new_key(database, "bob")
    with keyed_gateway(sim, database) as url:
        for _ in range(3):
            assert generate(url, alice)
        stream = {**GENERATE, "model": OTHER_MODEL, "stream": True}
        assert generate(url, bob, stream).is_success
        other = {**GENERATE, "model": OTHER_MODEL}
        assert generate(url, alice, other).status_code == 403
        metrics = httpx.get(f"{url}/metrics").text
        eventually(lambda: ledger_count(database), lambda n: n == 5)  # written within a second
    assert 'parallama_key_requests_total{key="alice",outcome="completed"} 3.0' in metrics
    assert 'parallama_key_requests_total{key="alice",outcome="rejected"} 1.0' in metrics
    assert "parallama_ledger_up 1.0" in metrics
    rows = json.loads(cli("usage", "--database", database, "--by", "key,model,day", "--json"))
    by = {(r["key"], r["model"]): r for r in rows}
    assert by["alice", CHAT_MODEL]["requests"] == 3
    assert by["alice", CHAT_MODEL]["prompt_tokens"] > 0
    assert by["alice", CHAT_MODEL]["generated_tokens"] > 0
    assert by["alice", OTHER_MODEL]["errors"] == 1  # the 403
    assert by["bob", OTHER_MODEL]["generated_tokens"] > 0  # a stream's counts too
    assert by["bob", OTHER_MODEL]["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    table = cli("usage", "--database", database, "--since", "1h")
    assert "alice" in table and "bob" in table
    csv_text = cli("usage", "--database", database, "--csv", "--by", "key")
    assert csv_text.splitlines()[0].startswith("key,requests,errors,prompt_tokens")


def test_usage_trace_writes_the_answered_requests_with_no_prompt_or_answer(
    sim: SimServer, database: str, tmp_path: Path
) -> None:
    alice = new_key(database, "alice")
    with keyed_gateway(sim, database) as url:
        answers = []
        for n in range(3):
            answered = generate(url, alice, {**GENERATE, "prompt": f"a secret question {n}"})
            answers.append(answered.json())
        assert generate(url, alice, {**GENERATE, "model": "absent:1b"}).status_code == 404
        eventually(lambda: ledger_count(database), lambda n: n == 4)
    out = tmp_path / "trace.jsonl"
    cli("usage", "--database", database, "--trace", str(out))
    text = out.read_text()
    assert "secret" not in text and answers[0]["response"] not in text
    trace = read_trace(out)
    assert [(t.model, t.prompt_tokens, t.generated_tokens, t.key) for t in trace] == [
        (CHAT_MODEL, a["prompt_eval_count"], a["eval_count"], "alice") for a in answers
    ]  # the 404 is not traffic to replay
    assert trace[0].time == 0 <= trace[1].time <= trace[2].time < 30
    replay = ("plan", "--replay", "ledger", "--database", database, "--instances", "1")
    planned = json.loads(cli(*replay, "--json", "-"))
    (replayed,) = planned["summaries"]  # the same requests, from the ledger itself
    assert replayed["ok"] == 3
    assert replayed["prompt_tokens"] == sum(t.prompt_tokens for t in trace)
    assert replayed["output_tokens"] == sum(t.generated_tokens for t in trace)


def test_the_admin_api_makes_lists_and_revokes_keys(sim: SimServer, database: str) -> None:
    with keyed_gateway(sim, database, admin_token="s3cret") as url:
        admin = {"Authorization": "Bearer s3cret"}
        made = httpx.post(
            f"{url}/parallama/keys",
            json={"name": "ci-bot", "rpm": 100, "models": ["qwen2.5:*"], "budget": "1000/week"},
            headers=admin,
        )
        assert made.status_code == 201
        key = made.json()["key"]
        assert made.json()["rpm"] == 100 and made.json()["budget"] == "1000/week"
        assert generate(url, key).is_success
        listed = httpx.get(f"{url}/parallama/keys", headers=admin).json()
        assert [k["name"] for k in listed] == ["ci-bot"]
        assert "key_hash" not in listed[0] and key not in json.dumps(listed)
        taken = httpx.post(f"{url}/parallama/keys", json={"name": "ci-bot"}, headers=admin)
        assert taken.status_code == 409
        bad = httpx.post(f"{url}/parallama/keys", json={"name": "x", "rpm": -1}, headers=admin)
        assert bad.status_code == 400 and "rpm" in bad.json()["error"]
        assert httpx.get(f"{url}/parallama/keys").status_code == 401  # no admin token
        usage = eventually(
            lambda: httpx.get(f"{url}/parallama/usage?since=1d&by=key", headers=admin).json(),
            lambda rows: bool(rows) and rows[0]["requests"] == 1,
        )
        assert usage[0]["key"] == "ci-bot"
        revoked = httpx.post(f"{url}/parallama/keys/revoke", json={"name": "ci-bot"}, headers=admin)
        assert revoked.json()["revoked_at"] is not None
        # Revoked through the gateway: refused at once, not within a second.
        assert generate(url, key).status_code == 401
        revoke = f"{url}/parallama/keys/revoke"
        assert httpx.post(revoke, json={"name": "nobody"}, headers=admin).status_code == 404


def test_two_gateways_on_one_sqlite_file_share_keys_and_ledger(
    sim: SimServer, tmp_path: Any
) -> None:
    database = str(tmp_path / "shared.db")
    key = new_key(database, "shared")
    with keyed_gateway(sim, database) as first, keyed_gateway(sim, database) as second:

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(
                    *(
                        client.post(f"{url}/api/generate", json=GENERATE, headers=bearer(key))
                        for url in (first, second)
                        for _ in range(20)
                    )
                )

        assert all(a.status_code == 200 for a in asyncio.run(both()))
        cli("keys", "revoke", "shared", "--database", database)
        served_since = 0  # until each gateway has seen the revocation

        def ask(url: str) -> httpx.Response:
            nonlocal served_since
            answer = generate(url, key)
            served_since += answer.status_code == 200
            return answer

        for url in (first, second):
            eventually(functools.partial(ask, url), lambda answer: answer.status_code == 401)
    # Every request either gateway served, in the one ledger (a 401 is no model request).
    assert ledger_count(database) == 40 + served_since


def test_a_key_made_on_one_gateway_works_at_once_on_another(sim: SimServer, tmp_path: Any) -> None:
    """Replicas behind one front: a key made through it (on either replica) is used by the next
    request, which may reach the other replica before that one's next poll of the keys."""
    database = str(tmp_path / "shared.db")
    with (
        keyed_gateway(sim, database, admin_token="s3cret") as first,
        keyed_gateway(sim, database, admin_token="s3cret") as second,
    ):
        admin = {"Authorization": "Bearer s3cret"}
        for n in range(5):
            made = httpx.post(f"{first}/parallama/keys", json={"name": f"k{n}"}, headers=admin)
            assert made.status_code == 201
            assert generate(second, made.json()["key"]).status_code == 200
        # Keys of the right shape that no gateway knows are still refused.
        key = made.json()["key"]
        for stranger in (key[:-4] + "abcd", "pk-zzzzzzzz-" + key.split("-", 2)[2]):
            assert generate(second, stranger).json()["error"] == "invalid API key"


def test_gateways_sharing_redis_count_a_keys_limits_together(
    sim: SimServer, tmp_path: Any, redis: RedisServer
) -> None:
    database = str(tmp_path / "shared.db")
    key = new_key(database, "fleet-wide", "--rpm", "10")
    with (
        keyed_gateway(sim, database, state=redis.url) as first,
        keyed_gateway(sim, database, state=redis.url) as second,
    ):

        async def both() -> list[httpx.Response]:
            return [*await burst(first, key, 8), *await burst(second, key, 8)]

        answers = asyncio.run(both())
    assert sorted(a.status_code for a in answers) == [200] * 10 + [429] * 6
    limited = [a for a in answers if a.status_code == 429]
    assert all(a.headers["x-ratelimit-remaining-requests"] == "0" for a in limited)
    assert all(55 <= int(a.headers["Retry-After"]) <= 60 for a in limited)


def test_a_keys_concurrency_is_counted_over_every_gateway(
    database: str, redis: RedisServer
) -> None:
    with sim_server(decode_tps=40.0, output_tokens=(40, 40), num_parallel=4) as slow:
        key = new_key(database, "one-at-a-time", "--max-concurrent", "1")
        with (
            keyed_gateway(slow, database, state=redis.url) as first,
            keyed_gateway(slow, database, state=redis.url) as second,
        ):

            async def one_each() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=30) as client:
                    running = asyncio.ensure_future(
                        client.post(f"{first}/api/generate", json=GENERATE, headers=bearer(key))
                    )
                    await asyncio.to_thread(
                        eventually,
                        lambda: model_state(state(slow.url), CHAT_MODEL),
                        lambda model: model is not None and model["busy"] == 1,
                    )
                    beside = await client.post(
                        f"{second}/api/generate", json=GENERATE, headers=bearer(key)
                    )
                    after = await running
                    again = await client.post(  # its place given back when the answer ended
                        f"{first}/api/generate", json=GENERATE, headers=bearer(key)
                    )
                    return [after, beside, again]

            after, beside, again = asyncio.run(one_each())
    assert (after.status_code, beside.status_code) == (200, 429)
    assert "1 concurrent requests" in beside.text
    assert again.status_code == 200


def test_with_redis_away_each_gateway_counts_a_keys_limits_alone(
    sim: SimServer, tmp_path: Any, redis: RedisServer
) -> None:
    database = str(tmp_path / "shared.db")
    key = new_key(database, "alone", "--rpm", "3")
    with keyed_gateway(sim, database, state=redis.url) as url:
        redis.kill()
        answers = asyncio.run(burst(url, key, 5))
    assert sorted(a.status_code for a in answers) == [200] * 3 + [429] * 2


# -- faults --------------------------------------------------------------------------------------


def test_postgresql_killed_mid_burst_fails_no_request_and_loses_no_row(sim: SimServer) -> None:
    with postgres_server() as pg:  # its own: this test kills it
        database = pg.new_database()
        key = new_key(database, "steady", "--rpm", "1000")
        with keyed_gateway(sim, database) as url:

            async def run() -> tuple[list[int], str]:
                statuses: list[int] = []
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:

                    async def one() -> None:
                        answer = await client.post(
                            "/api/generate", json=GENERATE, headers=bearer(key)
                        )
                        statuses.append(answer.status_code)

                    await asyncio.gather(*(one() for _ in range(40)))
                    await asyncio.to_thread(pg.kill)  # mid-burst: a crash, connections cut
                    await asyncio.gather(*(one() for _ in range(40)))
                    down = await asyncio.to_thread(
                        eventually,
                        lambda: httpx.get(f"{url}/metrics").text,
                        lambda text: "parallama_ledger_up 0.0" in text,
                        30.0,
                    )
                    await asyncio.gather(*(one() for _ in range(40)))  # still down
                return statuses, down

            statuses, down_metrics = asyncio.run(run())
            assert statuses == [200] * 120  # known keys kept working
            assert "parallama_database_up 0.0" in down_metrics
            pg.start()
            # Backoff is at most 10 s; then the buffered rows go in.
            eventually(lambda: ledger_count(database), lambda n: n == 120, timeout=40.0)
            eventually(
                lambda: httpx.get(f"{url}/metrics").text,
                lambda text: "parallama_ledger_up 1.0" in text,
            )


def test_an_outage_longer_than_the_buffer_loses_the_oldest_rows_and_says_so(
    sim: SimServer,
) -> None:
    with postgres_server() as pg:
        database = pg.new_database()
        key = new_key(database, "busy")
        with keyed_gateway(sim, database, ledger_buffer=100) as url:
            pg.kill()

            async def run() -> list[int]:
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    asked = (
                        client.post("/api/generate", json=GENERATE, headers=bearer(key))
                        for _ in range(130)
                    )
                    return [a.status_code for a in await asyncio.gather(*asked)]

            assert asyncio.run(run()) == [200] * 130
            metrics = eventually(
                lambda: httpx.get(f"{url}/metrics").text,
                lambda text: "parallama_ledger_dropped_rows_total 30.0" in text,
            )
            assert "parallama_ledger_buffered_rows 100.0" in metrics
            pg.start()
            eventually(lambda: ledger_count(database), lambda n: n == 100, timeout=40.0)


def serve_process(database: str, backend: str, *more: str) -> Any:
    return sim_process(
        "--port", "0", "--backend", backend, "--auth", "keys", "--database", database, *more,
        command="serve",
    )  # fmt: skip


def test_sigterm_writes_every_row_and_sigkill_loses_at_most_the_last_second(
    sim: SimServer, tmp_path: Any
) -> None:
    database = str(tmp_path / "ledger.db")
    key = new_key(database, "worker")
    with serve_process(database, sim.url) as (gateway, urls):
        for _ in range(10):
            assert generate(urls[0], key).status_code == 200
        gateway.send_signal(signal.SIGTERM)  # at once: the rows are still in memory
        assert gateway.wait(timeout=30) == 0
    assert ledger_count(database) == 10
    with serve_process(database, sim.url) as (gateway, urls):
        for _ in range(10):
            assert generate(urls[0], key).status_code == 200
        eventually(lambda: ledger_count(database), lambda n: n == 20)  # a second's batch
        for _ in range(5):
            assert generate(urls[0], key).status_code == 200
        gateway.kill()  # SIGKILL: no chance to write
        gateway.wait(timeout=10)
    assert 20 <= ledger_count(database) <= 25


def test_a_database_that_cannot_be_reached_at_start_is_a_clear_error(sim: SimServer) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port('127.0.0.1')}/nothing"
    started = subprocess.run(
        [sys.executable, "-m", "parallama", "serve", "--port", "0", "--backend", sim.url,
         "--auth", "keys", "--database", closed],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 1
    assert "parallama serve: error: database:" in started.stderr
    assert "Traceback" not in started.stderr


def test_bench_measures_through_a_keyed_gateway_with_its_api_key(
    sim: SimServer, database: str
) -> None:
    key = new_key(database, "bencher")
    with keyed_gateway(sim, database) as url:
        args = ["bench", url, "--requests", "6", "--concurrency", "2", "--model", CHAT_MODEL]
        args += ["--max-error-rate", "0"]  # any error fails the run
        assert main([*args, "--api-key", key]) == 0
        assert main(args) == 1  # without it: 401s
    rows = ledger_rows(database)
    assert {row["key"] for row in rows} == {"bencher"}
    assert sum(row["requests"] for row in rows) >= 6


# -- what an attacker with a key tries -----------------------------------------------------------

ANSWER = b'{"done":true,"prompt_eval_count":3,"eval_count":2}'
HTTP_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
HTTP_ANSWER += b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


def test_the_backend_never_sees_the_key_and_runs_only_the_model_checked(database: str) -> None:
    key = new_key(database, "narrow", "--models", "qwen2.5:*")

    async def scenario() -> list[RawRequest]:
        async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> None:
            writer.write(HTTP_ANSWER)

        async with raw_backend(answer) as backend:
            settings = {"auth": "keys", "database": database}
            with gateway_with((BackendSettings(url=backend.url),), **settings) as gateway:
                async with httpx.AsyncClient(base_url=gateway.url, headers=bearer(key)) as client:
                    asked = await client.post("/api/generate", json=GENERATE)
                    assert asked.status_code == 200
                    # Ollama's JSON decoder takes "MODEL" as "model" (the last one wins).
                    sneaky = b'{"model":"qwen2.5:7b","MODEL":"secret:70b","Name":"x","prompt":"hi"}'
                    answer_ = await client.post("/api/generate", content=sneaky)
                    assert answer_.status_code == 200
            return [r for r in backend.requests if not r.is_probe]

    sent = asyncio.run(scenario())
    assert len(sent) == 2
    for request in sent:
        assert b"authorization" not in request.head.lower()
        assert key.encode() not in request.head + request.body
    assert json.loads(sent[1].body) == {"model": "qwen2.5:7b", "prompt": "hi"}


def test_openai_streams_without_usage_still_count_against_token_limits(
    sim: SimServer, database: str
) -> None:
    key = new_key(database, "streamer", "--tpm", "10")
    body = {"model": CHAT_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with keyed_gateway(sim, database) as url:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=bearer(key)
        ) as streamed:
            chunks = list(streamed.iter_lines())
        assert streamed.status_code == 200
        assert not any('"usage":{' in line for line in chunks)  # the client did not ask for it
        again = httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key))
        assert again.status_code == 429
        metrics = httpx.get(f"{url}/metrics").text
    assert 'parallama_key_tokens_total{key="streamer",kind="generated"}' in metrics


def test_a_key_anywhere_in_the_url_is_refused(sim: SimServer, database: str) -> None:
    key = new_key(database, "careless2")
    with keyed_gateway(sim, database) as url:
        for query in (f"api%5Fkey={key}", f"x={key}", f"q=a%20{key}"):
            answer = httpx.post(f"{url}/api/generate?{query}", json=GENERATE, headers=bearer(key))
            assert answer.status_code == 401, query


def test_admin_routes_refuse_web_pages_and_forms(sim: SimServer, database: str) -> None:
    new_key(database, "victim")
    key = new_key(database, "victim2")
    with keyed_gateway(sim, database) as url:
        revoke = f"{url}/parallama/keys/revoke"
        from_a_page = httpx.post(
            revoke,
            content=b'{"name":"victim"}',
            headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        )
        assert from_a_page.status_code == 403
        as_a_form = httpx.post(
            revoke, content=b'{"name":"victim"}', headers={"Content-Type": "text/plain"}
        )
        assert as_a_form.status_code == 415
        rebound = httpx.get(f"{url}/parallama/keys", headers={"Host": "evil.example"})
        assert rebound.status_code == 403
        assert generate(url, key).status_code == 200
        assert httpx.post(revoke, json={"name": "victim"}).status_code == 200  # a script: fine


def test_a_model_name_postgresql_cannot_store_does_not_stop_the_ledger(
    sim: SimServer, postgres: Postgres
) -> None:
    database = postgres.new_database()
    key = new_key(database, "odd")
    with keyed_gateway(sim, database) as url:
        odd = generate(url, key, {**GENERATE, "model": "m\u0000"})
        assert odd.status_code == 404
        assert generate(url, key).status_code == 200
        eventually(lambda: ledger_count(database), lambda n: n == 2)
        assert "parallama_ledger_up 1.0" in httpx.get(f"{url}/metrics").text


def test_keys_work_on_a_postgresql_database_made_with_sql_ascii(
    sim: SimServer, postgres: Postgres
) -> None:
    """A cluster made by initdb where no UTF-8 locale is set (a minimal container) has
    SQL_ASCII databases, whose text psycopg hands over as bytes unless told the encoding."""
    import psycopg

    name = f"ascii_{os.getpid()}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0"
        )
    database = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    key = new_key(database, "ascii", "--models", "qwen2.5:*")
    with keyed_gateway(sim, database) as url:
        assert generate(url, key).status_code == 200
        eventually(lambda: ledger_count(database), lambda n: n == 1)


def test_gateways_starting_together_on_a_new_postgresql_database_all_start(
    postgres: Postgres,
) -> None:
    for _ in range(3):
        database = postgres.new_database()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            opened = list(pool.map(open_store, [database] * 3))
        for store in opened:
            assert store.revision() == 0
            store.close()


def test_a_paused_postgresql_shows_as_down_and_the_gateway_still_serves_and_stops(
    sim: SimServer,
) -> None:
    with postgres_server() as pg:
        database = pg.new_database()
        key = new_key(database, "patient")
        paused = []
        try:
            with keyed_gateway(sim, database) as url:
                for pid in postgres_pids(pg):  # alive to TCP, silent to queries
                    os.kill(pid, signal.SIGSTOP)
                    paused.append(pid)
                eventually(
                    lambda: httpx.get(f"{url}/metrics").text,
                    lambda text: "parallama_database_up 0.0" in text,
                )
                for _ in range(5):
                    assert generate(url, key).status_code == 200
            # ...and the block's end stopped the gateway, the database still silent.
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)


def test_a_key_with_the_manage_right_manages_models_and_others_may_not(
    sim: SimServer, database: str
) -> None:
    """A team's Open WebUI, with its own key, pulls a model; a key without the right, or
    none, is refused; the right shows in the key's listing."""
    manager = new_key(database, "webui", "--manage", "yes")
    user = new_key(database, "alice")
    pull = {"model": "phi3:mini", "stream": False}
    with keyed_gateway(sim, database, admin_token="s3cret") as url:
        pulled = httpx.post(f"{url}/api/pull", json=pull, headers=bearer(manager), timeout=10)
        refused = httpx.post(f"{url}/api/pull", json=pull, headers=bearer(user), timeout=10)
        anonymous = httpx.post(f"{url}/api/pull", json=pull, timeout=10)
    assert pulled.status_code == 200, pulled.text
    assert pulled.json()["status"] == "success"
    assert refused.status_code == 403
    assert "manage" in refused.json()["error"]
    assert anonymous.status_code == 401
    listed = cli("keys", "list", "--json", "--database", database)
    assert {k["name"]: k["manage"] for k in json.loads(listed)} == {
        "webui": True,
        "alice": False,
    }


def test_a_database_of_the_first_schema_is_brought_up_to_date_with_its_keys(
    tmp_path: Path,
) -> None:
    """Keys made before the `manage` right keep working, without it."""
    import sqlite3

    from parallama.teams.store import _MIGRATIONS

    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        for statement in _MIGRATIONS[0]:
            old.execute(statement)
        old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        old.execute("INSERT INTO schema_version (version) VALUES (1)")
        old.execute(
            "INSERT INTO keys VALUES ('old', 'abc123', 'x', 0, '', NULL, NULL, NULL, NULL, "
            "NULL, 1, NULL, NULL)"
        )
        old.commit()
    store = open_store(f"sqlite:///{path}")
    try:
        (key,) = store.keys()
    finally:
        store.close()
    assert key.name == "old"
    assert key.manage is False
