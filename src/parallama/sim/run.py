"""Running several emulated servers in one process until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from parallama.sim.config import SimConfig
from parallama.sim.server import SimServer


@contextlib.asynccontextmanager
async def running_servers(config: SimConfig) -> AsyncIterator[list[SimServer]]:
    """Start one `SimServer` per configured port; stop them all on exit."""
    servers = [SimServer(config, port) for port in config.ports]
    try:
        for server in servers:
            await server.start()
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def serve_until_stopped(config: SimConfig, announce: bool = True) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_servers(config) as servers:
        if announce:
            describe(config, servers)
        await stop.wait()


def describe(config: SimConfig, servers: list[SimServer]) -> None:
    t = config.timing
    s = config.scheduler
    models = ", ".join(m.name for m in config.models)
    print(f"parallama sim: {len(servers)} emulated Ollama server(s)", flush=True)
    for server in servers:
        print(f"  {server.url}", flush=True)
    print(
        f"  models: {models}\n"
        f"  num_parallel={s.num_parallel} max_queue={s.max_queue} "
        f"max_loaded_models={s.max_loaded_models} keep_alive={s.default_keep_alive:g}s\n"
        f"  prefill={t.prefill_tps:g} tok/s decode={t.decode_tps:g} tok/s "
        f"batch_slowdown={t.batch_slowdown:g} load={t.load_seconds:g}s\n"
        "  Ctrl-C to stop",
        flush=True,
    )
