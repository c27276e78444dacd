"""What shared slots buy on a saturated fleet, in one run: two gateway processes in front of the
same two emulated Ollama servers (2 slots each), once sharing their slots through Redis (a
local redis-server, started here) and once each on its own (each believes it has every slot:
what two replicas behind a load balancer do without shared state).

The same open-loop load each time: Poisson arrivals at 90 % of the fleet's capacity, every other
request to each gateway, streamed answers of 10 to 250 tokens (the same seeded sequence). Without
shared slots a backend gets more requests than its slots, and the rest wait unseen in Ollama's
own queue, behind whichever request happened to go to that server; with them, a request waits
in the gateways' shared order and is bound to the first slot that frees on either server.

Printed: time to first token (the wait, plus a prefill) and whole-request latency, p50 and p99,
for each; the target (issue 16) is a lower p99 wait with shared slots.

    python benchmarks/shared_slots.py [--seconds 40] [--load 0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp
from processes import redis, started

DECODE_TPS = 200.0  # per sequence: a 130-token answer holds a slot 0.65 s
TOKENS = (10, 250)
SLOTS, BACKENDS = 2, 2


@dataclass(frozen=True)
class Answer:
    first_token: float
    total: float


async def one(session: aiohttp.ClientSession, url: str, tokens: int) -> Answer:
    body = {"model": "qwen2.5:7b", "prompt": "hi", "options": {"num_predict": tokens}}
    began = time.perf_counter()
    first = 0.0
    async with session.post(f"{url}/api/generate", json=body) as answer:
        assert answer.status == 200, answer.status
        async for _ in answer.content:
            first = first or time.perf_counter() - began
    return Answer(first, time.perf_counter() - began)


async def load(urls: list[str], rate: float, seconds: float, seed: int) -> list[Answer]:
    """Poisson arrivals at `rate`, in turn to each gateway; every answer."""
    pick = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        asked: list[asyncio.Task[Answer]] = []
        clock, n = time.perf_counter(), 0
        deadline = clock + seconds
        while clock < deadline:
            clock += pick.expovariate(rate)
            await asyncio.sleep(max(0.0, clock - time.perf_counter()))
            tokens = pick.randint(*TOKENS)
            asked.append(asyncio.ensure_future(one(session, urls[n % len(urls)], tokens)))
            n += 1
        return list(await asyncio.gather(*asked))


def p(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(share * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="of load per setup (40)")
    parser.add_argument("--load", type=float, default=0.9, help="share of capacity (0.9)")
    args = parser.parse_args()
    mean_service = (sum(TOKENS) / 2) / DECODE_TPS
    rate = args.load * SLOTS * BACKENDS / mean_service
    sim = ["sim", "--port", "0", "--port", "0", "--profile", "fast", "--batch-slowdown", "0"]
    sim += ["--num-parallel", str(SLOTS), "--decode-tps", str(DECODE_TPS)]
    sim += ["--output-tokens", "1000"]  # natural answers longer than any asked: num_predict cuts
    results: dict[str, list[Answer]] = {}
    with started(*sim) as backends, redis() as (state, _):
        for name, extra in (("each on its own", ()), ("shared through Redis", ("--state", state))):
            gateways = []
            with contextlib.ExitStack() as stack:
                for _ in range(2):
                    serve = ["serve", "--port", "0", "--no-log-requests", "--queue-timeout", "300"]
                    for backend in backends[:BACKENDS]:
                        serve += ["--backend", backend]
                    serve += ["--slots", str(SLOTS), *extra]
                    gateways.append(stack.enter_context(started(*serve))[0])
                asyncio.run(load(gateways, rate, 3.0, seed=1))  # warm: models loaded, pools
                results[name] = asyncio.run(load(gateways, rate, args.seconds, seed=7))
    print(
        f"{len(results['shared through Redis'])} requests at {rate:.1f}/s "
        f"({args.load:.0%} of {SLOTS * BACKENDS} slots), per setup\n"
    )
    print(f"{'seconds':24}{'TTFT p50':>10}{'TTFT p99':>10}{'total p50':>11}{'total p99':>11}")
    for name, answers in results.items():
        first = [a.first_token for a in answers]
        total = [a.total for a in answers]
        cells = (p(first, 0.5), p(first, 0.99), p(total, 0.5), p(total, 0.99))
        print(f"{name:24}{cells[0]:>10.2f}{cells[1]:>10.2f}{cells[2]:>11.2f}{cells[3]:>11.2f}")
    alone, shared = (p([a.first_token for a in results[n]], 0.99) for n in results)
    print(f"\np99 wait (TTFT) shared / each on its own: {shared / alone:.2f}  [< 1]")


if __name__ == "__main__":
    main()
