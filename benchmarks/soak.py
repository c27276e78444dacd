"""A soak: the gateway under mixed load for a long while, hostile clients mixed in, its memory,
descriptors and counters looked at all along.

Two emulated Ollama servers (`parallama sim`) behind `parallama serve`, each in a process of
its own. Ordinary clients chat all the time (streamed and whole, through the Ollama and the
OpenAI API); beside them, hostile ones:

- big names: requests naming a 1 MB model, each a different one;
- big bodies: 24 MB bodies, past `max_body_bytes`;
- slowloris: connections that send their head a byte a second;
- disconnect storms: streams dropped after their first chunk;
- bad JSON: bodies that are not JSON, or not an object;
- bursts: 1,000 connections at once, each asking `/api/version`.

Every `--every` seconds it prints the gateway's resident memory, open descriptors and the
requests it counted; at the end, with the load stopped, whether the counters add up and
nothing is left in flight or queued. `--json` writes every sample; `--plot` the curve.

    python benchmarks/soak.py [--minutes 20] [--every 60] [--json soak.json] [--plot soak.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from processes import started, started_process

from parallama.core.tickets import Outcome

MODEL = "qwen2.5:7b"
MB = 1024 * 1024


def resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, url: str, counts: Counter[str]) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.url, self.host, self.port = url, host, int(port)
        self.counts = counts
        self.stop = asyncio.Event()

    async def every(self, seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        """`action` again and again, `seconds` apart, until the soak stops; its failures
        (the gateway refusing it is the point) are counted, never raised."""
        while not self.stop.is_set():
            try:
                await action()
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                self.counts[f"client error {type(exc).__name__}"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), seconds)

    # -- ordinary clients ---------------------------------------------------------------------

    async def chatter(self, http: aiohttp.ClientSession, n: int) -> None:
        async def once() -> None:
            if n % 2:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(f"{self.url}/api/chat", json=body) as answer:
                    async for _ in answer.content:
                        pass
                    self.counts[f"chat {answer.status}"] += 1
            else:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(f"{self.url}/v1/chat/completions", json=body) as answer:
                    await answer.read()
                    self.counts[f"openai {answer.status}"] += 1

        await self.every(0.05, once)

    # -- hostile clients ----------------------------------------------------------------------

    async def big_names(self, http: aiohttp.ClientSession) -> None:
        serial = 0

        async def once() -> None:
            nonlocal serial
            serial += 1
            body = {"model": f"{serial}" + "m" * MB, "prompt": "hi"}
            async with http.post(f"{self.url}/api/generate", json=body) as answer:
                await answer.read()
                self.counts[f"big name {answer.status}"] += 1

        await self.every(0.5, once)

    async def big_bodies(self, http: aiohttp.ClientSession) -> None:
        blob = b"x" * (24 * MB)

        async def once() -> None:
            async with http.post(f"{self.url}/api/chat", data=blob) as answer:
                await answer.read()
                self.counts[f"big body {answer.status}"] += 1

        await self.every(5.0, once)

    async def bad_json(self, http: aiohttp.ClientSession) -> None:
        bodies = [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"model": 7}']
        turn = 0

        async def once() -> None:
            nonlocal turn
            turn += 1
            body = bodies[turn % len(bodies)]
            headers = {"Content-Type": "application/json"}
            async with http.post(f"{self.url}/api/chat", data=body, headers=headers) as answer:
                await answer.read()
                self.counts[f"bad json {answer.status}"] += 1

        await self.every(0.2, once)

    async def slowloris(self) -> None:
        """Heads a byte a second: each held until the gateway's header timeout ends it."""

        async def one() -> None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                head = b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
                for byte in head + b"z" * 600:
                    writer.write(bytes([byte]))
                    if await _closed(reader, 1.0):
                        self.counts["slowloris cut off"] += 1
                        return
                self.counts["slowloris never cut off"] += 1
            finally:
                writer.close()

        async def wave() -> None:
            await asyncio.gather(*(one() for _ in range(40)), return_exceptions=True)

        await self.every(0.0, wave)

    async def disconnect_storm(self, http: aiohttp.ClientSession) -> None:
        async def one() -> None:
            body = {"model": MODEL, "prompt": "a long story", "options": {"num_predict": 400}}
            async with http.post(f"{self.url}/api/generate", json=body) as answer:
                await answer.content.readline()  # the first chunk, then gone
                self.counts["dropped stream"] += 1

        async def storm() -> None:
            await asyncio.gather(*(one() for _ in range(20)), return_exceptions=True)

        await self.every(10.0, storm)

    async def bursts(self, period: float) -> None:
        async def one() -> None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
                line = await asyncio.wait_for(reader.readline(), 30)
                self.counts[f"burst {line[9:12].decode() or 'closed'}"] += 1
            finally:
                writer.close()

        async def burst() -> None:
            await asyncio.gather(*(one() for _ in range(1000)), return_exceptions=True)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), period / 2)
        await self.every(period, burst)


async def _closed(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closed the connection (or answered) within `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(1024), seconds) is not None
    except TimeoutError:
        return False


async def status(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/parallama/status") as answer:
        found: dict[str, Any] = await answer.json()
        return found


async def soak(url: str, pid: int, minutes: float, every: float) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    run = Soak(url, counts)
    limit = aiohttp.TCPConnector(limit=0, force_close=False)
    samples: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(
        connector=limit, timeout=aiohttp.ClientTimeout(total=60)
    ) as http:
        loads = [
            *(run.chatter(http, n) for n in range(8)),
            run.big_names(http),
            run.big_bodies(http),
            run.bad_json(http),
            run.slowloris(),
            run.disconnect_storm(http),
            run.bursts(period=max(every, 30.0)),
        ]
        tasks = [asyncio.ensure_future(load) for load in loads]
        started_at = time.monotonic()
        try:
            while (elapsed := time.monotonic() - started_at) < minutes * 60:
                await asyncio.sleep(min(every, minutes * 60 - elapsed))
                said = await status(http, url)
                sample = {
                    "seconds": round(time.monotonic() - started_at, 1),
                    "rss_mb": round(resident(pid) / MB, 1),
                    "fds": descriptors(pid),
                    "total": said["total"],
                    "completed": said["completed"],
                    "rejected": said["rejected"],
                    "in_flight": said["in_flight"],
                }
                samples.append(sample)
                print(" | ".join(f"{k} {v}" for k, v in sample.items()), file=sys.stderr)
        finally:
            run.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(2)  # the gateway ends what the clients left (closed streams)
        final = await status(http, url)
    final_fds = descriptors(pid)
    outcomes = {o.value: final[o.value] for o in Outcome}
    left = final["in_flight"] + final["queued"]
    return {
        "samples": samples,
        "client": dict(sorted(counts.items())),
        "final": {k: final[k] for k in ("total", "in_flight", "queued")} | outcomes,
        "adds_up": final["total"] == sum(outcomes.values()) + left,
        "final_fds": final_fds,
        "final_rss_mb": round(resident(pid) / MB, 1),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    minutes = [s["seconds"] / 60 for s in samples]
    figure, memory = plt.subplots(figsize=(8, 4))
    memory.plot(minutes, [s["rss_mb"] for s in samples], color="tab:blue", label="resident MB")
    memory.set_xlabel("minutes")
    memory.set_ylabel("gateway resident memory (MB)", color="tab:blue")
    memory.set_ylim(bottom=0)
    files = memory.twinx()
    files.plot(minutes, [s["fds"] for s in samples], color="tab:orange", label="descriptors")
    files.set_ylabel("open descriptors", color="tab:orange")
    files.set_ylim(bottom=0)
    memory.set_title("parallama soak: mixed load with hostile clients")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="write the samples and totals here")
    parser.add_argument("--plot", type=Path, help="write the curve here (PNG)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 at once, and the rest
    with started("sim", "--port", "0", "--port", "0", "--profile", "fast") as sims:
        backends = [arg for url in sims[:2] for arg in ("--backend", url)]
        serve = ("serve", *backends, "--port", "0", "--no-log-requests")
        serve += ("--header-timeout", "5", "--body-timeout", "5", "--slots", "4")
        with started_process(*serve) as (urls, pid):
            report = asyncio.run(soak(urls[0], pid, args.minutes, args.every))
    report["date"] = time.strftime("%Y-%m-%d")
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if args.plot:
        plot(report, args.plot)
    samples = report["samples"]
    print("| minute | resident MB | descriptors | requests counted | completed | rejected |")
    print("|---|---|---|---|---|---|")
    for s in samples:
        print(
            f"| {s['seconds'] / 60:.1f} | {s['rss_mb']} | {s['fds']} | {s['total']} | "
            f"{s['completed']} | {s['rejected']} |"
        )
    print(
        f"\nat the end: {report['final']}, adds up: {report['adds_up']}, "
        f"descriptors {report['final_fds']}, resident {report['final_rss_mb']} MB"
    )
    print(f"clients saw: {report['client']}")


if __name__ == "__main__":
    main()
