"""Real emulated Ollama servers on loopback for tests, each in its own thread and event loop.

A thread (rather than the test's own loop) lets synchronous clients such as the official
`ollama` and `openai` packages talk to the server, exactly as a user's program would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    contextmanager,
)
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx

from parallama.config import BackendSettings, GatewaySettings, load
from parallama.gateway.app import Gateway
from parallama.gateway.run import running_gateway
from parallama.protocol import ollama
from parallama.runtime import new_event_loop
from parallama.sim.catalog import spec_for
from parallama.sim.config import SimConfig
from parallama.sim.run import running_servers
from parallama.sim.scheduler import OllamaSettings
from parallama.sim.server import SimServer
from parallama.sim.timing import TimingModel

T = TypeVar("T")
CHAT_MODEL = "qwen2.5:7b"
OTHER_MODEL = "llama3.2:3b"
EMBED_MODEL = "nomic-embed-text:latest"


def make_config(
    *,
    num_parallel: int = 1,
    max_queue: int = 512,
    max_loaded_models: int = 3,
    keep_alive: float = 300.0,
    models: tuple[str, ...] = (CHAT_MODEL, OTHER_MODEL, EMBED_MODEL),
    prefill_tps: float = 50_000.0,
    decode_tps: float = 1_000.0,
    batch_slowdown: float = 0.0,
    load_seconds: float = 0.0,
    output_tokens: tuple[int, int] = (8, 16),
    eviction: str = "ollama",
    ports: int = 1,
    version: str = ollama.CURRENT_VERSION,
) -> SimConfig:
    """A fast emulator configuration; tests slow down only what they measure."""
    return SimConfig(
        host="127.0.0.1",
        ports=(0,) * ports,
        models=tuple(spec_for(m) for m in models),
        scheduler=OllamaSettings(
            num_parallel=num_parallel,
            max_queue=max_queue,
            max_loaded_models=max_loaded_models,
            default_keep_alive=keep_alive,
            eviction="lru" if eviction == "lru" else "ollama",
        ),
        timing=TimingModel(prefill_tps, decode_tps, batch_slowdown, load_seconds),
        output_tokens=output_tokens,
        version=version,
    )


@contextmanager
def in_thread(start: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Enter an async context manager on its own event loop in a background thread."""
    ready = threading.Event()
    result: list[T] = []
    failure: list[BaseException] = []
    loop = new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with start() as value:
                result.append(value)
                ready.set()
                await stop.wait()
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    if failure:
        raise failure[0]
    try:
        yield result[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def sim_servers(config: SimConfig) -> AbstractContextManager[list[SimServer]]:
    """Run the configured emulated servers in a background thread until the block ends."""
    return in_thread(lambda: running_servers(config))


def gateway_for(servers: list[SimServer], **settings: Any) -> AbstractContextManager[Gateway]:
    """A gateway on a free loopback port in front of the given emulated servers."""
    return gateway_with(tuple(BackendSettings(url=s.url) for s in servers), **settings)


def gateway_with(
    backends: tuple[BackendSettings, ...], **settings: Any
) -> AbstractContextManager[Gateway]:
    config = GatewaySettings.model_validate({"port": 0, **settings, "backends": backends})
    return in_thread(lambda: running_gateway(config))


def gateway_from_file(path: Path) -> AbstractContextManager[Gateway]:
    """A gateway whose settings come from a TOML file, read again on reload."""

    def read() -> GatewaySettings:
        return load(path, env={})

    return in_thread(lambda: running_gateway(read(), read))


@contextmanager
def sim_server(**overrides: Any) -> Iterator[SimServer]:
    with sim_servers(make_config(**overrides)) as servers:
        yield servers[0]


def with_ports(config: SimConfig, count: int) -> SimConfig:
    return replace(config, ports=(0,) * count)


def state(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/_sim/state", timeout=5)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def gateway_status(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/parallama/status", timeout=5)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def eventually(read: Callable[[], T], holds: Callable[[T], bool], timeout: float = 10.0) -> T:
    """What `read()` returns once `holds` is true of it (a server's state is only observable
    by asking it, so this waits for an event; it is not sleeping for time to pass)."""
    deadline = time.monotonic() + timeout
    while True:
        current = read()
        if holds(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition never held: {current}")
        time.sleep(0.01)


def wait_for_state(url: str, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The emulator's `/_sim/state`, once `predicate` holds."""
    return eventually(lambda: state(url), predicate, timeout)


def wait_for_gateway(url: str, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The gateway's `/parallama/status`, once `predicate` holds."""
    return eventually(lambda: gateway_status(url), predicate, timeout)


def model_state(current: dict[str, Any], name: str) -> dict[str, Any]:
    """One model's row of the emulator state; an unloaded model has no busy or waiting slots."""
    absent = {"name": name, "state": "unloaded", "busy": 0, "waiting": 0}
    return next((m for m in current["models"] if m["name"] == name), absent)


async def burst(url: str, count: int, model: str = CHAT_MODEL) -> list[int]:
    """`count` concurrent non-streaming generations; their status codes."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> int:
            if model == EMBED_MODEL:
                embed = {"model": model, "input": f"text {i}"}
                return (await client.post("/api/embed", json=embed)).status_code
            body = {"model": model, "prompt": f"question {i}", "stream": False}
            return (await client.post("/api/generate", json=body)).status_code

        return list(await asyncio.gather(*(one(i) for i in range(count))))
