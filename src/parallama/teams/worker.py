"""One thread of its own for the database, that never holds up the gateway or its exit.

`asyncio`'s and `concurrent.futures`' thread pools are joined when the process exits: a call
stuck on a database that stopped answering (a paused server still acknowledges TCP, so no
timeout of the driver's fires) would then keep the gateway from ever exiting. This thread is a
daemon: callers put their own timeouts on what they await, and a stuck call is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_STOP = object()


class DatabaseThread:
    def __init__(self, name: str = "parallama-db") -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` on the thread, after the calls before it; its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((call, future, loop))
        return await future

    def stop(self) -> None:
        """No more calls: the thread ends after those queued (or with the process)."""
        self._calls.put(_STOP)

    def _run(self) -> None:
        while (item := self._calls.get()) is not _STOP:
            call, future, loop = item
            try:
                result, error = call(), None
            except Exception as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.done():  # its caller gave up waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
