"""Running a command's servers: their address, their listen queue, and until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def http_url(host: str, port: int) -> str:
    """The base URL of a server listening on `host:port` (an IPv6 host goes in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def system_backlog() -> int:
    """The longest listen queue the kernel grants (`net.core.somaxconn`; asyncio asks for 100,
    nginx for 511): what a burst of connections arriving while the event loop is busy needs."""
    try:
        return max(int(Path("/proc/sys/net/core/somaxconn").read_text()), 1)
    except (OSError, ValueError):
        return socket.SOMAXCONN


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event set at the first SIGINT or SIGTERM while the block runs, so that servers and
    processes shut down in order instead of being interrupted wherever they are."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def stop_requested() -> None:
    """Return at the first SIGINT or SIGTERM."""
    with stop_signals() as stop:
        await stop.wait()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (it is on Linux and macOS), else asyncio's loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop `run` runs on: uvloop's where it is installed, else asyncio's (tests that run a
    gateway in a thread must meet the loop the gateway meets in production)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (if it was started) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
