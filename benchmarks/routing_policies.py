"""Routing policies compared over emulated backends, each workload in one run.

**mixed**: three Ollama emulators, one of them three times slower; each has 2 slots per model
and room for only 2 loaded models (a load takes `--load` seconds), so a policy that scatters
models pays in loads and evictions; one of the fast ones is also used directly by an outside
client, `--outside` requests at a time, and tells how busy it is (`/slots`, as llama.cpp's
server does). Bursts of streaming requests over three models (60/30/10 %), the same (seeded)
for each policy. Printed: completed requests, p50/p99 latency and time to
first token, and the ratio of each to round-robin's (the seed's policy, and nginx's default),
which parallama runs here with late binding: a request is still sent only to a free slot. Then
model-affinity told each backend's room for models (`max_loaded_models`), and told it with the
three models kept warm (`warm`, `replicas` 3, 2 and 1, loaded as the bursts begin); least-loaded
over the same backends, each given by hand the models it serves (`models`: the most asked model
on all, the second on the fast two, the third on the slow one, so that no backend holds more
than it has room for); and a floor: model-affinity over the same backends whose loads take no
time, about the least any routing could reach (what a policy spares is loads, and the waits of
evictions).

**chat**: multi-turn conversations (`--conversations` of `--turns` turns, each opening with one
of four long shared system prompts, `--active` of them at a time) over three emulators of
different speeds with 4 slots each, whose prompt caches follow `--prompt-cache`'s rules:
llama.cpp's server, which Ollama runs since v0.30 (the default), with `--cache-ram` MiB of
host-RAM prompt cache each (8192, its default); or Ollama's own runners before v0.30 (a
sequence per slot, nothing more: `ollama-legacy`, and `ollama-legacy-multiuser` for
OLLAMA_MULTIUSER_CACHE=1).
Printed: time to first token p50/p99 per policy, and the share of prompt tokens found cached;
and a floor: least-loaded over the same engines with prefill that costs nothing, the least any
routing by prompt cache could reach (it can only save prefill).

**slots**: one emulated engine whose aggregate tokens/s peaks at 3 sequences at once (past
them, each more one slows all: `--batch-knee 3`), saturated by `--clients` closed-loop clients
for `--seconds`: fixed slots of 1, 4 and 8 against `slots = "auto"` (1 to 8). Printed: tokens/s
and p99 latency of each, and the slots learned.

Each policy gets fresh backends and its own gateway.

    python benchmarks/routing_policies.py [--workload mixed|chat|slots|all] [--bursts 4] ...
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
from typing import Any, Literal

import aiohttp
import orjson

from parallama.config import GatewaySettings
from parallama.core.kv_slots import CACHE_RULES, CacheRule
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
ROOM = 2  # models each mixed-workload backend keeps loaded at once
POLICIES: tuple[Policy, ...] = ("round-robin", "least-loaded", "model-affinity")


@dataclass(frozen=True)
class Result:
    ok: bool
    seconds: float
    first_token: float


def backend_config(decode_tps: float, load_seconds: float) -> SimConfig:
    return SimConfig(
        occupancy="slots",
        host="127.0.0.1",
        ports=(0,),
        models=tuple(spec_for(m) for m in MODELS),
        scheduler=OllamaSettings(num_parallel=2, max_loaded_models=ROOM),
        timing=TimingModel(
            prefill_tps=2000, decode_tps=decode_tps, batch_slowdown=0.3, load_seconds=load_seconds
        ),
        output_tokens=(40, 80),
    )


@contextlib.asynccontextmanager
async def gateway_over(
    configs: list[SimConfig],
    settings: dict[str, Any],
    backend: dict[str, Any] | None = None,
    each: list[dict[str, Any]] | None = None,
) -> AsyncIterator[tuple[str, list[str]]]:
    """An emulated server for each config, fresh, behind a gateway with `settings` (and
    `backend` in each `[[backends]]` table, and `each`'s in its own): its URL, and theirs."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for config in configs:
            servers = await stack.enter_async_context(running_servers(config))
            urls.append(servers[0].url)
        own = each or [{} for _ in urls]
        backends = [{"url": url, **(backend or {}), **o} for url, o in zip(urls, own, strict=True)]
        gateway_settings = GatewaySettings.model_validate(
            {"port": 0, "log_requests": False, **settings, "backends": backends}
        )
        gateway = await stack.enter_async_context(running_gateway(gateway_settings))
        yield gateway.url, urls


Told = Literal["nothing", "room", "room and warm", "placement"]
WARM = {m: {"warm": True, "replicas": n} for m, n in zip(MODELS, (3, 2, 1), strict=True)}


@contextlib.asynccontextmanager
async def fleet(
    policy: Policy, load_seconds: float, told: Told = "nothing"
) -> AsyncIterator[tuple[str, str]]:
    """Two normal backends and a slow one, fresh, behind a gateway with `policy`, told their
    room for models (`max_loaded_models`, and the models to keep warm), or the models each
    serves (`models`), or neither: its URL, and the first backend's."""
    configs = [backend_config(decode_tps, load_seconds) for decode_tps in (120.0, 120.0, 40.0)]
    settings: dict[str, Any] = {"slots": 2, "routing": policy, "occupancy_interval": 0.25}
    if told == "room and warm":
        settings["models"] = WARM
    first, second, third = MODELS
    each: list[dict[str, Any]] | None = None
    if told == "placement":
        each = [{"models": [first, m]} for m in (second, second, third)]
    elif told in ("room", "room and warm"):
        each = [{"max_loaded_models": ROOM}] * len(configs)
    async with gateway_over(configs, settings, {"occupancy": "slots"}, each) as (url, backends):
        yield url, backends[0]


@contextlib.asynccontextmanager
async def outside_client(url: str, at_once: int) -> AsyncIterator[None]:
    """Another user of one backend, straight to it: `at_once` requests at a time, for ever."""

    async def keep_asking(session: aiohttp.ClientSession) -> None:
        body = {"model": MODELS[0], "prompt": "outside", "stream": False}
        while True:
            async with session.post(f"{url}/api/generate", json=body) as reply:
                await reply.read()

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(keep_asking(session)) for _ in range(at_once)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


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


# -- chat: prompt caches ------------------------------------------------------------------------

CHAT_MODEL = "qwen2.5:7b"
CHAT_POLICIES: tuple[Policy, ...] = ("least-loaded", "session-affinity", "prefix-affinity")
WORDS = [
    "cache",
    "slot",
    "prefix",
    "token",
    "model",
    "answer",
    "engine",
    "request",
    "queue",
    "batch",
    "latency",
]


def chat_config(
    prefill_tps: float, decode_tps: float, prompt_cache: CacheRule, cache_ram_mib: int
) -> SimConfig:
    return SimConfig(
        prompt_cache=prompt_cache,
        cache_ram_mib=cache_ram_mib,
        host="127.0.0.1",
        ports=(0,),
        models=(spec_for(CHAT_MODEL),),
        scheduler=OllamaSettings(num_parallel=4, max_loaded_models=1, default_keep_alive=-1),
        timing=TimingModel(
            prefill_tps=prefill_tps, decode_tps=decode_tps, batch_slowdown=0.3, load_seconds=0
        ),
        output_tokens=(30, 60),
    )


@contextlib.asynccontextmanager
async def chat_fleet(
    policy: Policy, prompt_cache: CacheRule, cache_ram_mib: int, free_prefill: bool = False
) -> AsyncIterator[tuple[str, list[str]]]:
    """Three backends (prefill and decode tokens/s: two alike, one a third as fast; prefill
    instant if `free_prefill`) with 4 slots each, whose prompt caches follow `prompt_cache`'s
    rules, behind a gateway with `policy` that knows them; the gateway's URL and the backends'."""
    speeds = ((3000.0, 90.0), (3000.0, 90.0), (1000.0, 30.0))
    configs = [
        chat_config(1e12 if free_prefill else p, d, prompt_cache, cache_ram_mib) for p, d in speeds
    ]
    settings = {"slots": 4, "routing": policy, "queue_timeout": 300}
    told = {"prompt_cache": prompt_cache, "prompt_cache_ram": cache_ram_mib}
    async with gateway_over(configs, settings, told) as fleet:
        yield fleet


def system_prompts(count: int = 4, words: int = 1500) -> list[str]:
    """Long system prompts (instructions, documents) that many conversations share."""
    choose = random.Random(11)
    return [
        f"System {n}: " + " ".join(choose.choice(WORDS) for _ in range(words)) for n in range(count)
    ]


async def conversation(
    session: aiohttp.ClientSession, url: str, system: str, turns: int, seed: int
) -> list[Result]:
    """One user: a question, the answer, the next question with all before it, ..."""
    choose = random.Random(seed)
    messages = [{"role": "system", "content": system}]
    results = []
    for turn in range(turns):
        question = " ".join(choose.choice(WORDS) for _ in range(40)) + f" ({seed}.{turn})?"
        messages.append({"role": "user", "content": question})
        body = {"model": CHAT_MODEL, "messages": messages, "stream": True}
        started = time.monotonic()
        first = None
        answer = []
        async with session.post(f"{url}/api/chat", json=body) as reply:
            async for line in reply.content:
                if first is None:
                    first = time.monotonic()
                chunk = orjson.loads(line)
                answer.append(chunk.get("message", {}).get("content", ""))
            ok = reply.status == 200
        end = time.monotonic()
        results.append(Result(ok, end - started, (first or end) - started))
        messages.append({"role": "assistant", "content": "".join(answer)})
        await asyncio.sleep(choose.uniform(0.2, 1.0))  # the user reads, then asks again
    return results


async def chat_workload(url: str, conversations: int, turns: int, active: int) -> list[Result]:
    prompts = system_prompts()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    room = asyncio.Semaphore(active)

    async def one(n: int) -> list[Result]:
        async with room:
            return await conversation(session, url, prompts[n % len(prompts)], turns, n)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        done = await asyncio.gather(*(one(n) for n in range(conversations)))
    return [result for results in done for result in results]


async def cached_share(backends: list[str]) -> float:
    """The share of all prompt tokens the backends found in a slot's cache."""
    asked = cached = 0
    async with aiohttp.ClientSession() as session:
        for url in backends:
            async with session.get(f"{url}/_sim/state") as reply:
                state = await reply.json()
            asked += sum(state["prompt_tokens"].values())
            cached += sum(state["cached_tokens"].values())
    return cached / asked if asked else 0.0


FLOOR = "floor: no prefill"


async def measure_chat(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    runs: list[tuple[str, Policy, bool]] = [(p, p, False) for p in CHAT_POLICIES]
    for name, policy, free in [*runs, (FLOOR, "least-loaded", True)]:
        fleet = chat_fleet(policy, args.prompt_cache, args.cache_ram, free)
        async with fleet as (url, backends):
            results = await chat_workload(url, args.conversations, args.turns, args.active)
            share = await cached_share(backends)
        done = [r for r in results if r.ok]
        firsts = [r.first_token for r in done]
        table[name] = {
            "completed": len(done),
            "ttft50": percentile(firsts, 50),
            "ttft99": percentile(firsts, 99),
            "p50": percentile([r.seconds for r in done], 50),
            "cached": share,
        }
    return table


def print_chat(table: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    total = args.conversations * args.turns
    print(
        f"\nMulti-turn chat: {args.conversations} conversations x {args.turns} turns, "
        f"{args.active} at a time, 4 shared system prompts of 1,500 words;"
    )
    ram = (
        f", {args.cache_ram} MiB of RAM prompt cache each"
        if args.prompt_cache == "llama-server"
        else ""
    )
    print(
        "3 backends (prefill/decode tokens/s 3000/90, 3000/90, 1000/30), 4 slots each, "
        f"prompt caches by {args.prompt_cache}'s rules{ram}"
    )
    print(f"{'policy':20}{'completed':>11}{'ttft p50':>11}{'ttft p99':>11}{'p50':>11}{'cached':>9}")
    for policy, row in table.items():
        print(
            f"{policy:20}{int(row['completed']):>6}/{total:<4}{row['ttft50']:>9.2f} s"
            f"{row['ttft99']:>9.2f} s{row['p50']:>9.2f} s{row['cached']:>8.0%}"
        )
    base = table["least-loaded"]
    print("\nRatio to least-loaded (lower is better):")
    for policy, row in table.items():
        if policy != "least-loaded":
            print(
                f"  {policy}: ttft p50 {row['ttft50'] / base['ttft50']:.2f}x, "
                f"ttft p99 {row['ttft99'] / base['ttft99']:.2f}x"
            )


# -- slots: learned against fixed ----------------------------------------------------------------

SLOT_SETTINGS: tuple[int | str, ...] = (1, 4, 8, "auto")


@contextlib.asynccontextmanager
async def knee_fleet(slots: int | str) -> AsyncIterator[str]:
    """One engine with room for 3 sequences (8 slots of its own), behind a gateway."""
    config = SimConfig(
        host="127.0.0.1",
        ports=(0,),
        models=(spec_for(CHAT_MODEL),),
        scheduler=OllamaSettings(num_parallel=8, max_loaded_models=1, default_keep_alive=-1),
        timing=TimingModel(
            prefill_tps=4000, decode_tps=100, batch_slowdown=0.3, load_seconds=0, batch_knee=3
        ),
        output_tokens=(40, 40),
    )
    backend = {"slots": slots, "min_slots": 1, "max_slots": 8}
    async with gateway_over([config], {"queue_timeout": 300}, backend) as (url, _):
        yield url


async def closed_loop(url: str, clients: int, seconds: float) -> tuple[list[Result], int]:
    """`clients` each asking again as soon as answered, for `seconds`: the answers, and the
    tokens generated."""
    deadline = time.monotonic() + seconds
    results: list[Result] = []
    tokens = 0
    timeout = aiohttp.ClientTimeout(total=300)
    body = {"model": CHAT_MODEL, "prompt": "Count slowly.", "stream": False}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            started = time.monotonic()
            async with session.post(f"{url}/api/generate", json=body) as reply:
                answer = await reply.json()
            took = time.monotonic() - started
            results.append(Result(reply.status == 200, took, took))
            tokens += int(answer.get("eval_count", 0))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.monotonic() - started
    return results, round(tokens / elapsed)


async def measure_slots(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for slots in SLOT_SETTINGS:
        async with knee_fleet(slots) as url:
            results, tokens_per_second = await closed_loop(url, args.clients, args.seconds)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{url}/parallama/status") as reply,
            ):
                learned = (await reply.json())["backends"][0]["slots"]
        table[str(slots)] = {
            "tokens_per_second": tokens_per_second,
            "p99": percentile([r.seconds for r in results if r.ok], 99),
            "slots": learned,
        }
    return table


def print_slots(table: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(
        f"\nSlots: one engine at its best with 3 sequences at once, {args.clients} clients "
        f"asking without pause for {args.seconds:g} s"
    )
    print(f"{'slots':10}{'tokens/s':>10}{'p99':>10}{'slots at the end':>18}")
    for name, row in table.items():
        print(
            f"{name:10}{row['tokens_per_second']:>10.0f}{row['p99']:>8.2f} s{int(row['slots']):>18}"
        )
    fixed = [row for name, row in table.items() if name != "auto"]
    best = max(fixed, key=lambda row: row["tokens_per_second"])
    auto = table["auto"]
    print(
        f"auto against the best fixed setting: tokens/s "
        f"{auto['tokens_per_second'] / best['tokens_per_second']:.2f}x, "
        f"p99 {auto['p99'] / best['p99']:.2f}x"
    )


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if values else 0.0


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    runs: list[tuple[str, Policy, float, Told]] = [(p, p, args.load, "nothing") for p in POLICIES]
    runs += [
        ("model-affinity, room", "model-affinity", args.load, "room"),
        ("  and warm 3/2/1", "model-affinity", args.load, "room and warm"),
        ("placed by hand", "least-loaded", args.load, "placement"),
        ("floor: free loads", "model-affinity", 0.0, "nothing"),
    ]
    for name, policy, load, told in runs:
        async with (
            fleet(policy, load, told) as (url, used),
            outside_client(used, args.outside),
        ):
            results = await workload(url, args.bursts, args.burst_size, args.gap)
        done = [r for r in results if r.ok]
        latencies = [r.seconds for r in done]
        firsts = [r.first_token for r in done]
        table[name] = {
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
    parser.add_argument("--outside", type=int, default=1, help="mixed: outside requests (1)")
    parser.add_argument("--workload", choices=("mixed", "chat", "slots", "all"), default="all")
    parser.add_argument("--clients", type=int, default=12, help="slots: clients (12)")
    parser.add_argument("--seconds", type=float, default=60, help="slots: seconds each (60)")
    parser.add_argument("--conversations", type=int, default=100, help="chat: (100)")
    parser.add_argument("--turns", type=int, default=6, help="chat: turns each (6)")
    parser.add_argument("--active", type=int, default=24, help="chat: at a time (24)")
    parser.add_argument(
        "--prompt-cache",
        choices=CACHE_RULES,
        default="llama-server",
        help="chat: whose prompt-cache rules the engines follow (llama-server)",
    )
    parser.add_argument(
        "--cache-ram",
        type=int,
        default=8192,
        help="chat, llama-server: each engine's host-RAM prompt cache, MiB (8192, its default)",
    )
    args = parser.parse_args()
    table: dict[str, dict[str, float]] = {}
    chat: dict[str, dict[str, float]] = {}
    slots: dict[str, dict[str, float]] = {}

    async def go() -> None:
        if args.workload in ("mixed", "all"):
            table.update(await measure(args))
        if args.workload in ("chat", "all"):
            chat.update(await measure_chat(args))
        if args.workload in ("slots", "all"):
            slots.update(await measure_slots(args))

    run(go())
    if table:
        print_mixed(table, args)
    if chat:
        print_chat(chat, args)
    if slots:
        print_slots(slots, args)


def print_mixed(table: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    total = args.bursts * args.burst_size
    print(f"Routing policies: {args.bursts} bursts of {args.burst_size} streaming requests,")
    print("3 models (60/30/10 %), 3 backends (one 3x slower), 2 slots, 2 loaded models each;")
    print(f"{args.outside} request(s) at a time sent to a fast one directly by an outside client")
    columns = ("completed", "p50", "p99", "ttft50", "ttft99")
    print(f"{'policy':22}" + "".join(f"{c:>11}" for c in columns))
    for policy, row in table.items():
        cells = [f"{int(row['completed'])}/{total}"] + [f"{row[c]:.2f} s" for c in columns[1:]]
        print(f"{policy:22}" + "".join(f"{c:>11}" for c in cells))
    base = table["round-robin"]
    print("\nRatio to round-robin (lower is better):")
    for policy, row in table.items():
        if policy != "round-robin":
            ratios = ", ".join(f"{c} {row[c] / base[c]:.2f}x" for c in columns[1:] if base[c])
            print(f"  {policy}: {ratios}")


if __name__ == "__main__":
    main()
