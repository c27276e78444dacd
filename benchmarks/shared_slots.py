"""What sharing slots through Redis costs a request, in one run: the same gateway in front of the
same emulated backend, with `state = "memory"` and with `state = "redis://..."` (a local
redis-server, started here), one request at a time, and at concurrency 8 over 2 workers.

Printed: p50 latency at concurrency 1 for each and the difference (target, issue 16: Redis adds
at most 0.3 ms on loopback), and requests/s at concurrency 8.

    python benchmarks/shared_slots.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from processes import redis, started

from parallama.launch.supervisor import free_port

BODY = {"model": "qwen2.5:7b", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}


async def latencies(url: str, requests: int, concurrency: int) -> tuple[list[float], float]:
    times: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def loop(count: int) -> None:
            for _ in range(count):
                started_at = time.perf_counter()
                async with session.post(f"{url}/api/generate", json=BODY) as answer:
                    await answer.read()
                    assert answer.status == 200, answer.status
                times.append(time.perf_counter() - started_at)

        await loop(50)  # warm: connections, the model loaded
        times.clear()
        begun = time.perf_counter()
        await asyncio.gather(*(loop(requests // concurrency) for _ in range(concurrency)))
        return times, len(times) / (time.perf_counter() - begun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    requests = parser.parse_args().requests
    sim = ("sim", "--port", "0", "--profile", "fast", "--num-parallel", "8")
    rows = {}
    with started(*sim) as (backend, *_), redis() as state:
        for name, extra in (
            ("memory", ()),
            ("redis", ("--state", state)),
            ("redis, 2 workers", ("--state", state, "--workers", "2")),
        ):
            port = free_port("127.0.0.1")
            serve = ("serve", "--port", str(port), "--backend", backend, "--slots", "8")
            with started(*serve, "--no-log-requests", *extra):
                url = f"http://127.0.0.1:{port}"
                one, _ = asyncio.run(latencies(url, requests, 1))
                _, rate = asyncio.run(latencies(url, requests, 8))
                rows[name] = (statistics.median(one), rate)
    print(f"{'state':20}{'p50 at c=1 (ms)':>18}{'req/s at c=8':>14}")
    for name, (p50, rate) in rows.items():
        print(f"{name:20}{p50 * 1000:>18.3f}{rate:>14.0f}")
    added = (rows["redis"][0] - rows["memory"][0]) * 1000
    print(f"\nadded by Redis at p50, c=1: {added:.3f} ms  [<= 0.3 ms]")


if __name__ == "__main__":
    main()
