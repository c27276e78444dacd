"""Real occupancy: every `interval` seconds, each backend that can tell how busy it is gets asked
(`protocol.occupancy`), and the scheduler leaves room for what it runs beyond this gateway's own
requests: other clients that reach the engine directly, other gateways without shared state.

The source is a backend's `occupancy` setting; `auto` finds it on an OpenAI-dialect engine
(`/slots`, else vLLM's `/metrics`) and looks again every `REDETECT` seconds while none is found.
Ollama tells nothing of the kind, so `auto` asks it nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from parallama.config import BackendSettings
from parallama.core.scheduler import Scheduler
from parallama.gateway.http.upstream import Upstream
from parallama.protocol import occupancy
from parallama.protocol.occupancy import Source
from parallama.runtime import cancelled

log = logging.getLogger("parallama.occupancy")

REDETECT = 60.0  # seconds before an engine that told nothing is asked again


class OccupancyProbe:
    def __init__(
        self,
        scheduler: Scheduler,
        upstreams: Mapping[str, Upstream],
        settings_of: Callable[[str], BackendSettings | None],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self._scheduler = scheduler
        self._upstreams = upstreams  # live: reconfiguration changes it
        self._settings_of = settings_of
        self.interval = interval
        self.timeout = timeout
        self._found: dict[str, tuple[Source | None, float]] = {}  # auto: source, when found
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancelled(self._task)

    async def _run(self) -> None:
        while True:
            for name, backend in self._scheduler.backends.items():
                if not backend.online:
                    self._scheduler.observe_busy(name, None)  # it will be looked at afresh
            names = self._scheduler.online(self._upstreams)
            await asyncio.gather(*(self.look(name) for name in names))
            await asyncio.sleep(self.interval)

    async def look(self, name: str) -> None:
        """Ask one backend how busy it is; what it cannot tell counts as nothing."""
        busy = None
        try:
            upstream = self._upstreams.get(name)
            source = await self._source(name)
            if upstream is not None and source is not None:
                status, body = await upstream.get(occupancy.path_of(source), self.timeout)
                busy = occupancy.read(source, body) if status == 200 else None
        except Exception:  # one odd engine must not end the looks at all the others
            log.exception("occupancy not read", extra={"fields": {"backend": name}})
        self._scheduler.observe_busy(name, busy)

    async def _source(self, name: str) -> Source | None:
        settings = self._settings_of(name)
        if settings is None or settings.occupancy == "none":
            return None
        if settings.occupancy != "auto":
            return settings.occupancy
        if settings.kind != "openai":
            return None  # Ollama: nothing to read
        source, found_at = self._found.get(name, (None, -REDETECT))
        if source is None and time.monotonic() - found_at >= REDETECT:
            source = await self._detect(name)
            self._found[name] = (source, time.monotonic())
            if source is not None:
                log.info("occupancy found", extra={"fields": {"backend": name, "from": source}})
        return source

    async def _detect(self, name: str) -> Source | None:
        upstream = self._upstreams.get(name)
        if upstream is None:
            return None
        for source in occupancy.SOURCES:
            status, body = await upstream.get(occupancy.path_of(source), self.timeout)
            if status == 200 and occupancy.read(source, body) is not None:
                return source
        return None
