"""What warm models and pinned options buy over a day-like workload, in one run: the same two
emulated Ollama servers (one model loaded at a time each, as on a GPU that holds one, with
realistic load times), the same bursts after idle periods of two models from clients that mix
`num_ctx` 2048 and 8192 and sometimes send `keep_alive: 0`; once through a gateway that passes
all that on, once through one where both models are warm (one replica each) with their options
and keep_alive pinned.

Printed per setup: time to first token, p50 and p99, and the model loads the servers made
(a reload for a new `num_ctx` counts too). The target (issue 18): fewer loads and a lower TTFT
with warm and pinned models.

    python benchmarks/models_day.py [--bursts 4] [--load-seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from processes import started

MODELS = ("qwen2.5:7b", "llama3.2:3b")


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> float:
    began = time.perf_counter()
    async with session.post(f"{url}/api/generate", json=body) as answer:
        assert answer.status == 200, await answer.text()
        async for _ in answer.content:
            return time.perf_counter() - began
    raise AssertionError("an empty answer")


async def day(url: str, bursts: int, seed: int) -> list[float]:
    """Bursts of 12 requests over a second, after idle periods of 3 s: the first tokens."""
    pick = random.Random(seed)
    firsts: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for _ in range(bursts):
            asked = []
            for _ in range(12):
                body: dict[str, object] = {
                    "model": pick.choice(MODELS),
                    "prompt": "Why is the sky blue?",
                    "options": {"num_ctx": pick.choice((2048, 8192)), "num_predict": 16},
                }
                if pick.random() < 0.15:
                    body["keep_alive"] = 0  # a client that unloads what it used
                asked.append(asyncio.ensure_future(one(session, url, body)))
                await asyncio.sleep(1 / 12)
            firsts += await asyncio.gather(*asked)
            await asyncio.sleep(3.0)
    return firsts


def loads(backends: list[str]) -> int:
    return sum(sum(httpx.get(f"{u}/_sim/state").json()["loads"].values()) for u in backends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=4, help="bursts of 12 requests (4)")
    parser.add_argument("--load-seconds", type=float, default=2.0, help="a model's load (2)")
    args = parser.parse_args()
    pins = "".join(
        f'[models."{m}"]\nwarm = true\nreplicas = 1\nkeep_alive = -1\n'
        f"options = {{ num_ctx = 8192 }}\n\n"
        for m in MODELS
    )
    results: dict[str, tuple[list[float], int]] = {}
    for name, models in (("as clients ask", ""), ("warm and pinned", pins)):
        sim = ["sim", "--port", "0", "--port", "0", "--max-loaded-models", "1"]
        sim += ["--load-seconds", str(args.load_seconds), "--model", MODELS[0]]
        sim += ["--model", MODELS[1]]
        with started(*sim) as backends, tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / "gateway.toml"
            listed = "".join(f'[[backends]]\nurl = "{b}"\n' for b in backends[:2])
            config.write_text(f'routing = "model-affinity"\n{listed}\n{models}')
            serve = ("serve", "--port", "0", "--config", str(config), "--no-log-requests")
            with started(*serve) as (url, *_):
                if models:  # the warm loads, before the day begins
                    with contextlib.suppress(AssertionError):
                        for _ in range(100):
                            status = httpx.get(f"{url}/parallama/status").json()
                            placed = status["warm_models"].values()
                            if all(len(m["loaded_on"]) == 1 for m in placed):
                                break
                            time.sleep(0.1)
                before = loads(backends[:2])
                firsts = asyncio.run(day(url, args.bursts, seed=5))
                results[name] = firsts, loads(backends[:2]) - before
    print(f"{args.bursts} bursts of 12 requests after idle periods, two models, one loaded at a")
    print(f"time per server, {args.load_seconds:g} s a load\n")
    print(f"{'':18}{'TTFT p50':>10}{'TTFT p99':>10}{'loads':>8}")
    for name, (firsts, count) in results.items():
        p99 = statistics.quantiles(firsts, n=100, method="inclusive")[98]
        print(f"{name:18}{statistics.median(firsts):>10.2f}{p99:>10.2f}{count:>8}")


if __name__ == "__main__":
    main()
