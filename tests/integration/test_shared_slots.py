"""Several gateways in front of the same backends, sharing their slots through a real Redis."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from parallama.config import BackendSettings
from parallama.gateway.app import Gateway
from parallama.gateway.shared.slots import SharedSlots
from parallama.launch.supervisor import free_port
from tests.launchhelpers import alive, sim_process
from tests.rawhelpers import RawRequest, raw_backend
from tests.redishelpers import RedisServer
from tests.simhelpers import eventually, gateway_with

BODY = {"model": "m", "prompt": "hi", "stream": False}
ANSWER = b'{"done":true,"prompt_eval_count":3,"eval_count":2}'
HTTP_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
HTTP_ANSWER += b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


@dataclass
class Counted:
    """A backend that counts the requests it runs at once."""

    work: float
    running: int = 0
    peak: int = 0
    served: int = 0
    started: list[str] = field(default_factory=list)  # the prompts, in the order they began
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: requests wait at it

    def __post_init__(self) -> None:
        self.gate.set()


@asynccontextmanager
async def counted_backend(work: float) -> AsyncIterator[tuple[str, Counted]]:
    counted = Counted(work)

    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if request.is_probe:
            writer.write(HTTP_ANSWER)
            return
        counted.running += 1
        counted.started.append(json.loads(request.body)["prompt"])
        counted.peak = max(counted.peak, counted.running)
        try:
            await counted.gate.wait()
            await asyncio.sleep(counted.work)  # the engine at work
            writer.write(HTTP_ANSWER)
            counted.served += 1
        finally:
            counted.running -= 1

    async with raw_backend(answer) as backend:
        yield backend.url, counted


@contextmanager
def gateways(url: str, count: int, **settings: object) -> Iterator[list[Gateway]]:
    backend = (BackendSettings(url=url, slots=2),)
    with ExitStack() as stack:
        yield [stack.enter_context(gateway_with(backend, **settings)) for _ in range(count)]


async def burst(urls: list[str], requests: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=400)) as client:
        asked = (
            client.post(f"{urls[n % len(urls)]}/api/generate", json=BODY) for n in range(requests)
        )
        return [a.status_code for a in await asyncio.gather(*asked)]


@pytest.mark.parametrize("count", [2, 3])
def test_gateways_sharing_redis_never_run_more_than_a_backends_slots(
    redis: RedisServer, count: int
) -> None:
    async def scenario() -> tuple[list[int], Counted, list[dict[str, int]]]:
        async with counted_backend(work=0.02) as (url, counted):
            with gateways(url, count, state=redis.url, queue_timeout=120) as fleet:
                statuses = await burst([g.url for g in fleet], 300)
                return statuses, counted, [g.scheduler.accounting() for g in fleet]

    statuses, counted, accounts = asyncio.run(scenario())
    assert statuses == [200] * 300
    assert counted.peak <= 2  # the backend's slots, whichever gateway sent them
    assert counted.served == 300
    assert sum(a["completed"] for a in accounts) == 300  # every request counted once
    assert all(a["total"] == a["completed"] for a in accounts)
    assert not redis.client().keys("parallama:slots:*")  # every lease given back


def test_the_gateways_queues_are_served_in_one_order(redis: RedisServer) -> None:
    """A gateway with a long queue does not take every freed slot: requests of higher priority
    that wait at another gateway go first, as they would in one gateway's queue."""

    started, begun = asyncio.run(one_after_another(redis, "fifo", ("low", 0), ("high", 5)))
    after = started[begun:]
    assert after[:8] == ["high"] * 8


def test_fair_turns_are_taken_over_every_gateways_clients(redis: RedisServer) -> None:
    """Client x waits at both gateways, y at one: y still gets every other slot, not the one
    in four it would get if each gateway took turns only over its own clients."""
    started, begun = asyncio.run(one_after_another(redis, "fair", ("x", 0), ("y", 0), both=True))
    after = started[begun:]
    assert after[:16].count("y") >= 7  # in turns with x (which of the two goes first may vary)


async def one_after_another(
    redis: RedisServer,
    discipline: str,
    first: tuple[str, int],
    then: tuple[str, int],
    both: bool = False,
) -> tuple[list[str], int]:
    """30 requests of client `first` (its name, its priority) to one gateway (`both`: and 30 to
    the other), then 8 of `then` to the other gateway, all waiting while the backend holds the
    two it runs; once each gateway offered its requests in the shared order, the backend goes
    on. The clients in the order their requests began, and how many had begun before."""
    async with counted_backend(work=0.01) as (url, counted):
        settings = {"state": redis.url, "queue_timeout": 120, "discipline": discipline}
        with gateways(url, 2, **settings) as (busy, other):
            async with httpx.AsyncClient(timeout=60) as client:

                def ask(gateway: Gateway, name: str, priority: int) -> Any:
                    headers = {"X-Priority": str(priority), "X-Client-Id": name}
                    body = {**BODY, "prompt": name}
                    return client.post(f"{gateway.url}/api/generate", json=body, headers=headers)

                counted.gate.clear()
                asked = [
                    asyncio.ensure_future(ask(gateway, *first))
                    for gateway in ((busy, other) if both else (busy,))
                    for _ in range(30)
                ]
                await asyncio.to_thread(eventually, lambda: counted.running, lambda n: n == 2)
                asked += [asyncio.ensure_future(ask(other, *then)) for _ in range(8)]
                heads = redis.client()

                def offered() -> list[Any]:
                    return [
                        heads.hget("parallama:heads:m:latest", shared(g).gateway) for g in fleet
                    ]

                fleet = (busy, other)
                await asyncio.to_thread(
                    eventually,
                    lambda: (sum(g.scheduler.queued for g in fleet), offered()),
                    lambda seen: seen[0] == len(asked) - 2 and all(seen[1]),
                )
                begun = len(counted.started)
                counted.gate.set()
                answers = await asyncio.gather(*asked)
                assert {a.status_code for a in answers} == {200}
                return counted.started, begun


def shared(gateway: Gateway) -> SharedSlots:
    assert gateway.shared is not None
    return gateway.shared


def test_any_gateway_shows_the_whole_fleets_queue_and_in_flight(redis: RedisServer) -> None:
    async def scenario() -> tuple[dict[str, Any], str]:
        async with counted_backend(work=30.0) as (url, _):  # answers nobody waits for
            with gateways(url, 2, state=redis.url) as (first, second):
                async with httpx.AsyncClient(timeout=60) as client:
                    asked = [
                        asyncio.ensure_future(client.post(f"{g.url}/api/generate", json=BODY))
                        for g in (first, second)
                        for _ in range(4)
                    ]
                    fleet = await asyncio.to_thread(
                        eventually,
                        lambda: httpx.get(f"{second.url}/parallama/status").json()["fleet"],
                        lambda fleet: fleet["queued"] == 6 and fleet["in_flight"] == 2,
                    )
                    metrics = await asyncio.to_thread(  # as of the first's own renewal
                        eventually,
                        lambda: httpx.get(f"{first.url}/metrics").text,
                        lambda text: (
                            "parallama_fleet_in_flight 2.0" in text
                            and "parallama_fleet_queued 6.0" in text
                        ),
                    )
                    for request in asked:
                        request.cancel()
                    return fleet, metrics

    fleet, metrics = asyncio.run(scenario())
    assert fleet["gateways"] == 2 and len(fleet["members"]) == 2
    assert fleet["queues"] == {"m:latest": 6}
    assert sorted(m["queued"] + m["in_flight"] for m in fleet["members"].values()) == [4, 4]
    assert 'parallama_fleet_queue_depth{model="m:latest"} 6.0' in metrics


@pytest.mark.parametrize(
    ("status", "seen"),
    [(500, {"breaker": "open"}), (503, {"breaker": "closed", "capacity": 1})],
)
def test_a_backend_found_failing_or_busy_by_one_gateway_is_spared_by_all(
    redis: RedisServer, status: int, seen: dict[str, Any]
) -> None:
    """Its probes still answer: only the other gateway's word tells the second one."""
    answer = b'{"error":"server busy"}' if status == 503 else b'{"error":"boom"}'
    failing = b"HTTP/1.1 %d Oops\r\nContent-Type: application/json\r\n" % status
    failing += b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)

    async def respond(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(HTTP_ANSWER if request.is_probe else failing)

    async def scenario() -> dict[str, Any]:
        async with raw_backend(respond) as backend:
            settings = {"state": redis.url, "health_interval": 600, "retries": 0}
            with gateways(backend.url, 2, **settings) as (first, second):
                async with httpx.AsyncClient(timeout=60) as client:
                    for _ in range(3):  # the breaker's threshold
                        answer = await client.post(f"{first.url}/api/generate", json=BODY)
                        assert answer.status_code == status
                return await asyncio.to_thread(
                    eventually,
                    lambda: httpx.get(f"{second.url}/parallama/status").json()["backends"][0],
                    lambda b: all(b[k] == v for k, v in seen.items()),
                )

    assert asyncio.run(scenario()) is not None


def test_without_shared_state_the_same_gateways_oversubscribe() -> None:
    async def scenario() -> Counted:
        async with counted_backend(work=0.05) as (url, counted):
            with gateways(url, 2) as fleet:
                assert await burst([g.url for g in fleet], 40) == [200] * 40
                return counted

    assert asyncio.run(scenario()).peak > 2  # what the shared leases prevent


def test_a_gateway_killed_mid_burst_loses_only_its_own_requests(redis: RedisServer) -> None:
    """Its clients see their connections fail; the other gateway's burst, waiting for the slots
    the dead one held, completes once its leases lapse (the ttl)."""

    async def scenario() -> list[int]:
        async with counted_backend(work=0.01) as (url, counted):
            args = ["--port", "0", "--backend", url, "--slots", "2", "--state", redis.url]
            with (
                gateways(url, 1, state=redis.url, queue_timeout=120) as (survivor,),
                sim_process(*args, command="serve") as (doomed, urls),
            ):
                async with httpx.AsyncClient(timeout=60) as client:
                    counted.gate.clear()  # the doomed gateway's two hold both slots
                    held = [
                        asyncio.ensure_future(client.post(f"{urls[0]}/api/generate", json=BODY))
                        for _ in range(2)
                    ]
                    await asyncio.to_thread(eventually, lambda: counted.running, lambda n: n == 2)
                    burst = [
                        asyncio.ensure_future(
                            client.post(f"{survivor.url}/api/generate", json=BODY)
                        )
                        for _ in range(20)
                    ]
                    await asyncio.to_thread(
                        eventually, lambda: survivor.scheduler.queued, lambda n: n == 20
                    )
                    doomed.send_signal(signal.SIGKILL)  # no chance to give its leases back
                    doomed.wait(10)
                    for request in held:
                        with pytest.raises(httpx.TransportError):
                            await request
                    counted.gate.set()
                    return [answer.status_code for answer in await asyncio.gather(*burst)]

    assert asyncio.run(scenario()) == [200] * 20  # on the slots the dead gateway held


def test_redis_killed_and_restarted_loses_and_repeats_no_request(redis: RedisServer) -> None:
    async def scenario() -> tuple[list[int], Counted, list[int], str]:
        async with counted_backend(work=0.02) as (url, counted):
            with gateways(url, 2, state=redis.url, queue_timeout=120) as fleet:
                urls = [g.url for g in fleet]
                peaks, statuses = [], await burst(urls, 60)
                peaks.append(counted.peak)
                redis.kill()
                down = await asyncio.to_thread(
                    eventually,
                    lambda: httpx.get(f"{urls[0]}/metrics").text,
                    lambda text: "parallama_shared_state_up 0.0" in text,
                )
                counted.peak = 0
                statuses += await burst(urls, 60)  # each gateway on its share: one slot
                peaks.append(counted.peak)
                redis.start()  # back, empty
                await asyncio.to_thread(
                    eventually,
                    lambda: httpx.get(f"{urls[0]}/metrics").text,
                    lambda text: "parallama_shared_state_up 1.0" in text,
                )
                counted.peak = 0
                statuses += await burst(urls, 60)
                peaks.append(counted.peak)
                alive = [line for line in down.splitlines() if line.startswith("parallama_gate")]
                return statuses, counted, peaks, alive[0]

    statuses, counted, peaks, alive = asyncio.run(scenario())
    assert statuses == [200] * 180
    assert counted.served == 180  # none lost, none sent twice
    assert peaks[0] <= 2 and peaks[2] <= 2  # shared, before and after
    assert peaks[1] <= 2  # during the outage, each its share: 2 slots over 2 gateways
    assert alive == "parallama_gateways_alive 2.0"


def test_workers_share_one_port_and_the_slots(redis: RedisServer) -> None:
    port = free_port("127.0.0.1")

    async def scenario() -> tuple[list[int], Counted, str, list[int], int]:
        async with counted_backend(work=0.02) as (url, counted):
            args = ["--port", str(port), "--backend", url, "--slots", "2", "--workers", "2"]
            printed: list[str] = []
            with sim_process(*args, "--state", redis.url, command="serve", printed=printed) as (
                parent,
                _,
            ):
                statuses = await burst([f"http://127.0.0.1:{port}"], 100)
                metrics = (
                    await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")
                ).text
                pids = [
                    int(p) for p in re.findall(r"\d+", printed[0].split("pids")[1].split(")")[0])
                ]
                parent.send_signal(signal.SIGTERM)
                status = await asyncio.to_thread(parent.wait, 30)
            return statuses, counted, metrics, pids, status

    statuses, counted, metrics, pids, status = asyncio.run(scenario())
    assert statuses == [200] * 100
    assert counted.peak <= 2
    assert "parallama_gateways_alive 2.0" in metrics
    assert status == 0
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)  # stopped with it


def test_workers_without_shared_state_are_refused_with_the_reason() -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "parallama", "serve", "--port", str(free_port("127.0.0.1")),
         "--backend", "http://127.0.0.1:9", "--workers", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert 'needs state = "redis://...' in refused.stderr
