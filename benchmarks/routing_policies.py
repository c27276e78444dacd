"""Routing policies compared on one mixed workload over emulated backends, in one run.

Three Ollama emulators, one of them three times slower; each has 2 slots per model and room for
only 2 loaded models (a load takes `--load` seconds), so a policy that scatters models pays in
loads and evictions. The workload: bursts of streaming requests over three models (60/30/10 %),
the same (seeded) for each policy. Each policy gets fresh backends and its own gateway.

Printed per policy: completed requests, p50/p99 latency and p50/p99 time to first token, and
the ratio of each to round-robin's (the seed's policy, and nginx's default), which parallama
runs here with late binding: a request is still sent only to a free slot.

    python benchmarks/routing_policies.py [--bursts 4] [--burst-size 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from parallama.config import GatewaySettings
from parallama.core.router import Policy
from parallama.gateway.run import running_gateway
from parallama.runtime import run
from parallama.sim.catalog import spec_for
from parallama.sim.config import SimConfig
from parallama.sim.run import running_servers
from parallama.sim.scheduler import OllamaSettings
from parallama.sim.timing import TimingModel

MODELS = ("qwen2.5:7b", "llama3.2:3b", "mistral:7b")
MODEL_WEIGHTS = (6, 3, 1)
POLICIES: tuple[Policy, ...] = ("round-robin", "least-loaded", "model-affinity")


@dataclass(frozen=True)
class Result:
    ok: bool
    seconds: float
    first_token: float


def backend_config(decode_tps: float, load_seconds: float) -> SimConfig:
    return SimConfig(
        host="127.0.0.1",
        ports=(0,),
        models=tuple(spec_for(m) for m in MODELS),
        scheduler=OllamaSettings(num_parallel=2, max_loaded_models=2),
        timing=TimingModel(
            prefill_tps=2000, decode_tps=decode_tps, batch_slowdown=0.3, load_seconds=load_seconds
        ),
        output_tokens=(40, 80),
    )


@contextlib.asynccontextmanager
async def fleet(policy: Policy, load_seconds: float) -> AsyncIterator[str]:
    """Two normal backends and a slow one, fresh, behind a gateway with `policy`."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for decode_tps in (120.0, 120.0, 40.0):
            servers = await stack.enter_async_context(
                running_servers(backend_config(decode_tps, load_seconds))
            )
            urls.append(servers[0].url)
        settings = GatewaySettings.model_validate(
            {
                "port": 0,
                "slots": 2,
                "routing": policy,
                "log_requests": False,
                "backends": [{"url": url} for url in urls],
            }
        )
        gateway = await stack.enter_async_context(running_gateway(settings))
        yield gateway.url


async def one_request(session: aiohttp.ClientSession, url: str, model: str, n: int) -> Result:
    started = time.monotonic()
    first = None
    body = {"model": model, "prompt": f"question {n}", "stream": True}
    async with session.post(f"{url}/api/generate", json=body) as reply:
        async for _ in reply.content.iter_any():
            if first is None:
                first = time.monotonic()
        ok = reply.status == 200
    end = time.monotonic()
    return Result(ok, end - started, (first or end) - started)


async def workload(
    url: str, bursts: int, burst_size: int, gap: float, seed: int = 7
) -> list[Result]:
    choose = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    tasks = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for burst in range(bursts):
            for i in range(burst_size):
                model = choose.choices(MODELS, MODEL_WEIGHTS)[0]
                request = one_request(session, url, model, burst * burst_size + i)
                tasks.append(asyncio.ensure_future(request))
            await asyncio.sleep(gap)
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if values else 0.0


async def measure(args: argparse.Namespace) -> dict[Policy, dict[str, float]]:
    table: dict[Policy, dict[str, float]] = {}
    for policy in POLICIES:
        async with fleet(policy, args.load) as url:
            results = await workload(url, args.bursts, args.burst_size, args.gap)
        done = [r for r in results if r.ok]
        latencies = [r.seconds for r in done]
        firsts = [r.first_token for r in done]
        table[policy] = {
            "completed": len(done),
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "ttft50": percentile(firsts, 50),
            "ttft99": percentile(firsts, 99),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=4, help="bursts (default 4)")
    parser.add_argument("--burst-size", type=int, default=30, help="requests each (30)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds between bursts (3)")
    parser.add_argument("--load", type=float, default=1.5, help="model load seconds (1.5)")
    args = parser.parse_args()
    table: dict[Policy, dict[str, float]] = {}

    async def go() -> None:
        table.update(await measure(args))

    run(go())
    total = args.bursts * args.burst_size
    print(f"Routing policies: {args.bursts} bursts of {args.burst_size} streaming requests,")
    print("3 models (60/30/10 %), 3 backends (one 3x slower), 2 slots, 2 loaded models each")
    columns = ("completed", "p50", "p99", "ttft50", "ttft99")
    print(f"{'policy':16}" + "".join(f"{c:>11}" for c in columns))
    for policy, row in table.items():
        cells = [f"{int(row['completed'])}/{total}"] + [f"{row[c]:.2f} s" for c in columns[1:]]
        print(f"{policy:16}" + "".join(f"{c:>11}" for c in cells))
    base = table["round-robin"]
    print("\nRatio to round-robin (lower is better):")
    for policy, row in table.items():
        if policy != "round-robin":
            ratios = ", ".join(f"{c} {row[c] / base[c]:.2f}x" for c in columns[1:] if base[c])
            print(f"  {policy}: {ratios}")


if __name__ == "__main__":
    main()
