"""Running several emulated servers in one process until interrupted."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from parallama.protocol.durations import format_duration
from parallama.runtime import stop_requested
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
    async with running_servers(config) as servers:
        if announce:
            describe(config, servers)
        await stop_requested()


def describe(config: SimConfig, servers: list[SimServer]) -> None:
    """Say what runs where, and how to try it (the last line is always "Ctrl-C to stop")."""
    t = config.timing
    s = config.scheduler
    model = next((m.name for m in config.models if not m.is_embedding), config.models[0].name)
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}'
    lines = [
        f"parallama sim: {len(servers)} emulated Ollama server(s)",
        *(f"  {server.url}" for server in servers),
        "  models: " + ", ".join(m.name for m in config.models),
        f"  num_parallel={s.num_parallel} max_queue={s.max_queue} "
        f"max_loaded_models={s.max_loaded_models} "
        f"keep_alive={format_duration(s.default_keep_alive)}",
        f"  prefill={t.prefill_tps:g} tok/s decode={t.decode_tps:g} tok/s "
        f"batch_slowdown={t.batch_slowdown:g} load={t.load_seconds:g}s",
        f"Try:  curl -s {servers[0].url}/api/chat -d '{body}'",
        "Ctrl-C to stop",
    ]
    print("\n".join(lines), flush=True)
