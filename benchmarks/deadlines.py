"""What `X-Request-Deadline` buys under overload, in one run: the same gateway in front of the
same emulated Ollama server (2 slots, answers of about half a second), offered three times what
it can serve, by clients that each give up after the same deadline: once as today (the client
just times out; the gateway drops its request when it goes), once sending `X-Request-Deadline`
(the gateway refuses at once what its queue cannot serve in time).

Printed per setup: the share of requests answered within their deadline, the share refused at
once, and the answers within the deadline per second (goodput). The target (issue 17) is a
larger share within the deadline with deadlines sent.

    python benchmarks/deadlines.py [--seconds 30] [--deadline 3] [--overload 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass

import aiohttp
from processes import started

SLOTS, DECODE_TPS, TOKENS = 2, 100.0, 50  # an answer holds a slot about half a second


@dataclass(frozen=True)
class Outcome:
    in_time: bool
    refused: bool


async def one(session: aiohttp.ClientSession, url: str, deadline: float, send: bool) -> Outcome:
    body = {"model": "qwen2.5:7b", "prompt": "hi", "stream": False}
    body["options"] = {"num_predict": TOKENS}
    headers = {"X-Request-Deadline": f"{deadline:g}"} if send else {}
    began = time.perf_counter()
    try:
        async with asyncio.timeout(deadline):  # the client gives up then, either way
            async with session.post(f"{url}/api/generate", json=body, headers=headers) as answer:
                await answer.read()
                if answer.status == 503:
                    return Outcome(False, time.perf_counter() - began < 0.5)
                return Outcome(answer.status == 200, False)
    except TimeoutError:
        return Outcome(False, False)


async def load(url: str, rate: float, seconds: float, deadline: float, send: bool) -> list[Outcome]:
    pick = random.Random(3)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        asked: list[asyncio.Task[Outcome]] = []
        clock = time.perf_counter()
        end = clock + seconds
        while clock < end:
            clock += pick.expovariate(rate)
            await asyncio.sleep(max(0.0, clock - time.perf_counter()))
            asked.append(asyncio.ensure_future(one(session, url, deadline, send)))
        return list(await asyncio.gather(*asked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="of load per setup (30)")
    parser.add_argument("--deadline", type=float, default=3.0, help="each client's, s (3)")
    parser.add_argument("--overload", type=float, default=3.0, help="times capacity (3)")
    args = parser.parse_args()
    capacity = SLOTS * DECODE_TPS / TOKENS
    rate = args.overload * capacity
    sim = ["sim", "--port", "0", "--profile", "fast", "--num-parallel", str(SLOTS)]
    sim += ["--decode-tps", str(DECODE_TPS), "--batch-slowdown", "0", "--output-tokens", "1000"]
    results: dict[str, list[Outcome]] = {}
    with started(*sim) as (backend, *_):
        for name, send in (("clients time out", False), ("X-Request-Deadline", True)):
            serve = ["serve", "--port", "0", "--backend", backend, "--slots", str(SLOTS)]
            with started(*serve, "--no-log-requests") as (url, *_others):
                asyncio.run(load(url, capacity / 2, 3.0, 30.0, False))  # warm: service times
                results[name] = asyncio.run(load(url, rate, args.seconds, args.deadline, send))
    print(
        f"{rate:.1f} requests/s offered ({args.overload:g}x the {capacity:.1f}/s it can serve) for "
        f"{args.seconds:g} s; every client gives up after {args.deadline:g} s\n"
    )
    print(f"{'':22}{'in time':>10}{'refused at once':>17}{'goodput (/s)':>14}")
    for name, outcomes in results.items():
        in_time = sum(o.in_time for o in outcomes)
        refused = sum(o.refused for o in outcomes)
        share, at_once = in_time / len(outcomes), refused / len(outcomes)
        print(f"{name:22}{share:>10.0%}{at_once:>17.0%}{in_time / args.seconds:>14.2f}")


if __name__ == "__main__":
    main()
