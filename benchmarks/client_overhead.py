"""What the client library's HTTP stack costs per request, in one run: httpx (sync and async,
what `parallama.client` uses) against aiohttp, sequential keep-alive GETs to one emulated
Ollama server on loopback. The server's own time is in every figure alike.

    python benchmarks/client_overhead.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import httpx

from parallama.sim.config import SimConfig
from parallama.sim.run import running_servers


async def with_aiohttp(url: str, requests: int) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as warm:
            await warm.read()
        started = time.perf_counter()
        for _ in range(requests):
            async with session.get(url) as reply:
                await reply.read()
        return (time.perf_counter() - started) / requests


async def with_httpx_async(url: str, requests: int) -> float:
    async with httpx.AsyncClient() as client:
        await client.get(url)
        started = time.perf_counter()
        for _ in range(requests):
            (await client.get(url)).read()
        return (time.perf_counter() - started) / requests


def with_httpx_sync(url: str, requests: int) -> float:
    with httpx.Client() as client:
        client.get(url)
        started = time.perf_counter()
        for _ in range(requests):
            client.get(url).read()
        return (time.perf_counter() - started) / requests


async def main(requests: int) -> None:
    async with running_servers(SimConfig(host="127.0.0.1", ports=(0,))) as (server,):
        url = server.url + "/api/version"
        async_httpx = await with_httpx_async(url, requests)
        async_aiohttp = await with_aiohttp(url, requests)
        sync_httpx = await asyncio.to_thread(with_httpx_sync, url, requests)
    base = async_aiohttp
    for name, seconds in (
        ("aiohttp", async_aiohttp),
        ("httpx async", async_httpx),
        ("httpx sync", sync_httpx),
    ):
        print(f"{name:12} {seconds * 1e6:7.0f} µs per request ({seconds / base:.2f}x aiohttp)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args().requests))
