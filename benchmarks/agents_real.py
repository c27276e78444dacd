"""Coding-agent sessions on three real llama-server engines, routed five ways in one run:
parallama's gateway with `least-loaded`, `round-robin` and `prefix-affinity`, and SMG (the
SGLang model gateway) with `cache_aware` and, as a control, `round_robin`, all in front of the
same engines.

The workload is `parallama bench --sessions`: sessions that share a system prompt with tool
definitions, each turn appending the last answer and a tool result, streamed chat completions,
sessions arriving over time. Setups take turns in slices (the order reversed every other
round), each slice with prompts of its own (no slice finds another's cached), and each engine's
own counters (`llamacpp:prompt_tokens_total`, `..._cached_total`) are read around every slice:
how many prompt tokens each router made the engines evaluate, and how many they found cached.

Printed per setup: time to first token p50 and p99, generated tokens/s, and per engine the
prompt tokens evaluated / cached. Engines: SmolLM2-135M-Instruct on the CPU, one thread each,
two slots each (`-np 2 -c 16384 --cache-ram 1024`), found or built as `parallama llama-server`
does. SMG: `pip install smg`.

    python benchmarks/agents_real.py [--sessions 6] [--turns 4] [--rounds 2] [--rate 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import httpx
from processes import started

from parallama.bench.runner import Plan, Setup, run_http
from parallama.bench.sessions import SessionShape
from parallama.bench.stats import Sample, summarize
from parallama.bench.workload import Workload
from parallama.launch.engines import SMOLLM2_ALIAS, launch, template
from parallama.launch.llama_build import ensure_llama_server, ensure_smollm2
from parallama.launch.supervisor import Supervisor, free_port
from parallama.runtime import run

ENGINES = 3
SLOTS = 2
CACHE_RAM = 1024
# label, routing, prefix_wait (prefix affinity without waiting for a prefix being computed too)
POLICIES = (
    ("least-loaded", "least-loaded", 0.0),
    ("round-robin", "round-robin", 0.0),
    ("prefix-affinity", "prefix-affinity", 0.0),
    ("prefix-affinity, prefix_wait = 0.25", "prefix-affinity", 0.25),
)
SMG_POLICIES = ("cache_aware", "round_robin")
Counters = dict[str, tuple[float, float]]  # engine URL: prompt tokens evaluated, cached


@contextlib.asynccontextmanager
async def engines(log_dir: Path) -> AsyncIterator[list[str]]:
    instances = template(
        "llama-server", ENGINES, 0, model=str(ensure_smollm2()), alias=SMOLLM2_ALIAS,
        threads=1, ctx=8192 * SLOTS, parallel=SLOTS, cache_ram=CACHE_RAM,
    )  # fmt: skip
    program = str(ensure_llama_server())
    launches = [
        launch(item, i, free_port("127.0.0.1"), log_dir=log_dir, llama_server=program)
        for i, item in enumerate(instances)
    ]
    supervisor = Supervisor(launches)
    await supervisor.start()
    try:
        yield [item.url for item in launches]
    finally:
        await supervisor.stop()


def gateway_config(policy: str, wait: float, backends: list[str], config: Path) -> str:
    """A `parallama serve` settings file: the policy, the engines as llama-server backends."""
    config.write_text(
        f'host = "127.0.0.1"\nport = 0\nrouting = "{policy}"\nprefix_wait = {wait}\n'
        + "".join(
            f'[[backends]]\nurl = "{url}"\nslots = {SLOTS}\nprompt_cache = "llama-server"\n'
            f"prompt_cache_ram = {CACHE_RAM}\n"
            for url in backends
        )
    )
    return str(config)


@contextlib.contextmanager
def smg(policy: str, backends: list[str]) -> Iterator[str]:
    """SMG's router with `policy` in front of the engines, once it finds them all healthy."""
    port = free_port("127.0.0.1")
    program = shutil.which("smg") or str(Path(sys.executable).parent / "smg")
    argv = [
        program, "launch", "--worker-urls", *backends, "--host", "127.0.0.1", "--port",
        str(port), "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port",
        str(free_port("127.0.0.1")), "--worker-startup-check-interval", "1", "--log-level",
        "warn",
    ]  # fmt: skip
    router = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not ready(url):
            if router.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SMG ({policy}) did not find the engines healthy")
            time.sleep(0.2)
        yield url
    finally:
        router.terminate()
        router.wait(30)


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        readiness = httpx.get(f"{url}/readiness", timeout=2).json()
        return bool(readiness["healthy_workers"] == ENGINES)
    return False


async def counters(backends: list[str]) -> Counters:
    out: Counters = {}
    async with aiohttp.ClientSession() as session:
        for url in backends:
            async with session.get(f"{url}/metrics") as reply:
                lines = (await reply.text()).splitlines()
            values = {
                line.split()[0]: float(line.split()[1])
                for line in lines
                if line.startswith("llamacpp:prompt_tokens")
            }
            out[url] = (
                values["llamacpp:prompt_tokens_total"],
                values["llamacpp:prompt_tokens_cached_total"],
            )
    return out


async def measure(args: argparse.Namespace) -> None:
    shape = SessionShape(args.sessions, args.turns, args.system_tokens, args.tool_tokens)
    workload = Workload("openai", "chat", SMOLLM2_ALIAS, max_tokens=args.max_tokens, sessions=shape)
    with tempfile.TemporaryDirectory(prefix="parallama-agents-real-") as scratch:
        async with engines(Path(scratch)) as backends, contextlib.AsyncExitStack() as stack:
            setups = []
            for n, (label, policy, wait) in enumerate(POLICIES):
                config = gateway_config(policy, wait, backends, Path(scratch) / f"{n}.toml")
                urls = stack.enter_context(
                    started("serve", "--config", config, "--no-log-requests")
                )
                setups.append(Setup(f"parallama {label}", urls[0]))
            if args.smg:
                for policy in SMG_POLICIES:
                    setups.append(
                        Setup(f"SMG {policy}", stack.enter_context(smg(policy, backends)))
                    )
            samples: dict[str, list[Sample]] = {s.label: [] for s in setups}
            seconds = dict.fromkeys(samples, 0.0)
            work: dict[str, dict[str, list[float]]] = {
                s.label: {url: [0.0, 0.0] for url in backends} for s in setups
            }
            for round_ in range(args.rounds):
                for setup in setups if round_ % 2 == 0 else setups[::-1]:
                    plan = Plan(
                        (setup,), workload, "sessions", (args.rate,), rounds=1, timeout=900,
                        seed=round_, salt=f"{setups.index(setup)}r{round_}x{time.time_ns()}",
                    )  # fmt: skip
                    before = await counters(backends)
                    started_at = time.perf_counter()
                    result = await run_http(plan)
                    seconds[setup.label] += time.perf_counter() - started_at
                    after = await counters(backends)
                    samples[setup.label] += result.samples
                    for url in backends:
                        work[setup.label][url][0] += after[url][0] - before[url][0]
                        work[setup.label][url][1] += after[url][1] - before[url][1]
                    print(f"round {round_ + 1}, {setup.label}: done", file=sys.stderr)
    report(args, samples, seconds, work, backends)


def report(
    args: argparse.Namespace,
    samples: dict[str, list[Sample]],
    seconds: dict[str, float],
    work: dict[str, dict[str, list[float]]],
    backends: list[str],
) -> None:
    print(
        f"\n{args.sessions * args.rounds} sessions of {args.turns} turns per setup "
        f"({args.system_tokens}-token system prompt, {args.tool_tokens}-token tool results, "
        f"{args.max_tokens} tokens an answer, {args.rate:g} sessions/s), {ENGINES} llama-server "
        f"engines of {SLOTS} slots, SmolLM2-135M, CPU\n"
    )
    names = " | ".join(f"engine {i + 1} evaluated / cached" for i in range(len(backends)))
    print(f"| router | errors | TTFT p50 | TTFT p99 | tokens/s | gateway wait p50 | {names} |")
    print("|---|---|---|---|---|---|" + "---|" * len(backends))
    base = None
    for label, mine in samples.items():
        summary = summarize(label, args.rate, mine, seconds[label])
        p50, p99 = summary.first_token["p50"], summary.first_token["p99"]
        tps = summary.tokens_per_second
        if base is None:
            base = (p50, p99, tps)
            cells = [f"{p50:.1f} s", f"{p99:.1f} s", f"{tps:.1f}"]
        else:
            cells = [
                f"{p50:.1f} s ({p50 / base[0]:.2f}x)",
                f"{p99:.1f} s ({p99 / base[1]:.2f}x)",
                f"{tps:.1f} ({tps / base[2]:.2f}x)",
            ]
        wait = summary.queue_wait["p50"]
        cells.append("n/a" if math.isnan(wait) else f"{wait:.1f} s")  # SMG tells none
        engines_cells = [f"{work[label][u][0]:,.0f} / {work[label][u][1]:,.0f}" for u in backends]
        errors = sum(summary.errors.values())
        print(f"| {label} | {errors} | " + " | ".join(cells + engines_cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=6, help="per setup and round")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.5, help="sessions arriving per second")
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--tool-tokens", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-smg", dest="smg", action="store_false", help="parallama only")
    run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
