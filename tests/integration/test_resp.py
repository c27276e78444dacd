"""parallama's own Redis client against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from parallama.errors import ConfigError
from parallama.resp import UNAVAILABLE, NoScriptError, Redis, ReplyError, Script, parse_url
from tests.redishelpers import RedisServer, redis_server
from tests.simhelpers import eventually


def test_a_pipeline_answers_each_command_in_order(redis: RedisServer) -> None:
    async def scenario() -> list[object]:
        client = Redis(redis.url)
        try:
            return await client.execute(
                [["SET", "k", "v"], ["INCRBY", "n", 41], ["INCR", "n"], ["GET", "k"], ["GET", "x"]]
            )
        finally:
            await client.close()

    assert asyncio.run(scenario()) == [b"OK", 41, 42, b"v", None]


def test_an_error_answer_is_raised_and_a_lost_script_given_again(redis: RedisServer) -> None:
    script = Script("return ARGV[1] .. KEYS[1]")

    async def scenario() -> tuple[object, object]:
        client = Redis(redis.url)
        try:
            with pytest.raises(ReplyError, match="WRONGTYPE"):
                await client.execute([["SET", "s", "1"], ["LPUSH", "s", "x"]])
            with pytest.raises(NoScriptError):
                await client.call(*script.call(["k"], ["a"]))
            first = await client.run(script, ["k"], ["a"])
            await client.call("SCRIPT", "FLUSH")
            return first, await client.run(script, ["k"], ["b"])
        finally:
            await client.close()

    assert asyncio.run(scenario()) == (b"ak", b"bk")


def test_it_connects_again_after_redis_restarted(redis: RedisServer) -> None:
    async def scenario() -> object:
        client = Redis(redis.url)
        try:
            await client.call("PING")
            redis.kill()
            with pytest.raises(UNAVAILABLE):
                await client.call("PING")
            redis.start()
            return await client.call("PING")
        finally:
            await client.close()

    assert asyncio.run(scenario()) == b"PONG"


def test_a_password_and_a_database_from_the_url() -> None:
    with redis_server(password="s3cret") as secured:

        async def scenario() -> object:
            url = secured.url.replace("/0", "/3")
            client = Redis(url)
            try:
                await client.call("SET", "where", "db3")
                return await client.call("GET", "where")
            finally:
                await client.close()

        assert asyncio.run(scenario()) == b"db3"
        assert secured.client().get("where") is None  # not in database 0

        async def refused() -> None:
            await Redis(secured.url.replace("s3cret", "wrong")).call("PING")

        with pytest.raises(ReplyError, match=r"WRONGPASS|invalid"):
            asyncio.run(refused())


def test_a_subscription_gets_the_messages_published(redis: RedisServer) -> None:
    async def scenario() -> list[tuple[bytes, bytes]]:
        client, got = Redis(redis.url), []

        async def listen() -> None:
            async for message in client.messages("a", "b"):
                got.append(message)
                if len(got) == 2:
                    return

        listening = asyncio.ensure_future(listen())
        await asyncio.to_thread(  # nothing tells another connection it is subscribed: ask
            eventually, lambda: redis.client().pubsub_numsub("b"), lambda n: n == [(b"b", 1)]
        )
        await client.execute([["PUBLISH", "a", "1"], ["PUBLISH", "c", "x"], ["PUBLISH", "b", "2"]])
        await asyncio.wait_for(listening, 5)
        await client.close()
        return got

    assert asyncio.run(scenario()) == [(b"a", b"1"), (b"b", b"2")]


@pytest.mark.parametrize("url", ["http://x", "redis://", "redis://h:port", "redis://h/db"])
def test_urls_it_cannot_use_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)
