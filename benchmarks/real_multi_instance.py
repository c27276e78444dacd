"""The seed's multi-instance claim on a real model, in one run: one llama.cpp server used
directly against two behind `parallama up`, same prompts, same concurrency.

Setups (SmolLM2-135M-Instruct, llama.cpp's llama-server with two slots, on this machine's CPU):
- direct: one server with 2 threads, clients on its own `/v1/chat/completions`;
- parallama up (OpenAI API): `parallama up --demo-real`, two servers with 1 thread each, the same
  requests sent to the gateway (passed through);
- parallama up (Ollama API): the same gateway, the same work asked as `/api/chat` (translated to
  the engine's dialect and back).

Printed per setup: requests/s, generated tokens/s, p50 and p99 latency, and the ratio of each to
direct. llama-server and the model are found, or built and fetched once.

    python benchmarks/real_multi_instance.py [--requests 32] [--concurrency 4] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from parallama.launch.engines import SMOLLM2_ALIAS, launch, template
from parallama.launch.llama_build import ensure_llama_server, ensure_smollm2
from parallama.launch.supervisor import Supervisor, free_port
from parallama.runtime import run

PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is a hash table?",
    "Give three tips for better sleep.",
    "Explain recursion to a child.",
    "What causes the seasons on Earth?",
    "Name a few uses of Python.",
    "How does a bicycle stay upright?",
]


@dataclass(frozen=True)
class Run:
    seconds: float
    latencies: list[float]
    tokens: int

    def row(self, name: str, base: Run | None) -> str:
        qps = len(self.latencies) / self.seconds
        tps = self.tokens / self.seconds
        p50 = statistics.median(self.latencies)
        p99 = statistics.quantiles(self.latencies, n=100)[98]
        cells = [f"{qps:.2f}", f"{tps:.0f}", f"{p50:.2f} s", f"{p99:.2f} s"]
        if base is not None:
            b_qps = len(base.latencies) / base.seconds
            b_p50 = statistics.median(base.latencies)
            b_p99 = statistics.quantiles(base.latencies, n=100)[98]
            cells = [
                f"{qps:.2f} ({qps / b_qps:.2f}x)",
                f"{tps:.0f} ({tps / (base.tokens / base.seconds):.2f}x)",
                f"{p50:.2f} s ({p50 / b_p50:.2f}x)",
                f"{p99:.2f} s ({p99 / b_p99:.2f}x)",
            ]
        return f"| {name} | " + " | ".join(cells) + " |"


def body(path: str, prompt: str, max_tokens: int) -> bytes:
    messages = [{"role": "user", "content": prompt}]
    if path == "/api/chat":
        return orjson.dumps(
            {
                "model": SMOLLM2_ALIAS,
                "messages": messages,
                "stream": False,
                "options": {"num_predict": max_tokens, "temperature": 0},
            }
        )
    return orjson.dumps(
        {"model": SMOLLM2_ALIAS, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    )


def generated(path: str, answer: dict[str, object]) -> int:
    if path == "/api/chat":
        return int(str(answer.get("eval_count", 0)))
    usage = answer.get("usage")
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


async def load(url: str, path: str, requests: int, concurrency: int, max_tokens: int) -> Run:
    """`requests` chats, `concurrency` at a time, each client sending its next when one ends."""
    latencies: list[float] = []
    tokens = 0
    queue = list(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while queue:
            n = queue.pop()
            started = time.perf_counter()
            payload = body(path, PROMPTS[n % len(PROMPTS)], max_tokens)
            async with session.post(
                url + path, data=payload, headers={"Content-Type": "application/json"}
            ) as reply:
                answer = orjson.loads(await reply.read())
                if reply.status != 200:
                    raise RuntimeError(f"{url}{path} answered {reply.status}: {answer}")
            latencies.append(time.perf_counter() - started)
            tokens += generated(path, answer)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(2)))  # warm-up, not counted
        latencies.clear()
        tokens = 0
        queue[:] = list(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return Run(time.perf_counter() - started, latencies, tokens)


@contextlib.asynccontextmanager
async def one_server(threads: int, log_dir: Path) -> AsyncIterator[str]:
    (instance,) = template(
        "llama-server", 1, 0, model=str(ensure_smollm2()), alias=SMOLLM2_ALIAS, threads=threads,
        ctx=8192, parallel=2,
    )  # fmt: skip
    program = str(ensure_llama_server())
    port = free_port("127.0.0.1")
    supervisor = Supervisor([launch(instance, 0, port, log_dir=log_dir, llama_server=program)])
    await supervisor.start()
    try:
        yield supervisor.instances[0].launch.url
    finally:
        await supervisor.stop()


@contextlib.asynccontextmanager
async def parallama_up(log_dir: Path) -> AsyncIterator[str]:
    """`parallama up --demo-real` as a user runs it, in its own process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "parallama", "up", "--demo-real", "--port", "0", "--log-dir", str(log_dir)),
        "--no-log-requests",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    url = ""
    try:
        while line := (await process.stdout.readline()).decode():
            found = re.search(r"gateway on (http://\S+)", line)
            url = found.group(1) if found else url
            if line.startswith("Ctrl-C"):
                break
        if not url:
            raise RuntimeError("parallama up did not start")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


async def main(requests: int, concurrency: int, max_tokens: int) -> None:
    with tempfile.TemporaryDirectory(prefix="parallama-bench-logs-") as logs:
        async with one_server(threads=2, log_dir=Path(logs)) as url:
            direct = await load(url, "/v1/chat/completions", requests, concurrency, max_tokens)
        async with parallama_up(Path(logs)) as url:
            passed = await load(url, "/v1/chat/completions", requests, concurrency, max_tokens)
            translated = await load(url, "/api/chat", requests, concurrency, max_tokens)
    print(
        f"SmolLM2-135M, {requests} chats, {concurrency} concurrent clients, "
        f"up to {max_tokens} tokens each\n"
        "| setup | requests/s | tokens/s | p50 latency | p99 latency |\n|---|---|---|---|---|\n"
        + "\n".join(
            [
                direct.row("one llama.cpp server, 2 threads, direct", None),
                passed.row("two servers, 1 thread each, parallama up (OpenAI API)", direct),
                translated.row("two servers, 1 thread each, parallama up (Ollama API)", direct),
            ]
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    run(main(args.requests, args.concurrency, args.max_tokens))
