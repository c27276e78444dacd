"""Warm models kept loaded: after every probe of the fleet, the loads `core.placement` asks for
are started, each an empty prompt (Ollama's preload) with the model's pinned `keep_alive`, or
-1 (kept for ever) when none is pinned; the backend is probed again once it answered."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from parallama.config import GatewaySettings
from parallama.core.placement import Warm, kept_copies, loads_wanted, placement
from parallama.core.scheduler import Scheduler
from parallama.gateway.http.upstream import Upstream, UpstreamError

log = logging.getLogger("parallama.warming")

_JSON = [(b"Content-Type", b"application/json")]
_REST_SECONDS = 30.0  # after a load that failed, before that backend is asked again


class Warmer:
    def __init__(
        self,
        scheduler: Scheduler,
        upstream: Callable[[str], Upstream],
        probe_now: Callable[[str], None],
    ) -> None:
        self._scheduler = scheduler
        self._upstream = upstream
        self._probe_now = probe_now
        self._warm: list[Warm] = []
        self._keep_alive: dict[str, str | int | float] = {}
        self._options: dict[str, dict[str, Any]] = {}  # pinned: loaded as requests will ask
        self._loading: set[tuple[str, str]] = set()
        self._resting: dict[tuple[str, str], float] = {}  # failed loads: not again until then
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads = 0  # started so far

    def apply(self, settings: GatewaySettings) -> None:
        """The warm models of these settings (at start and on reload)."""
        self._warm, self._keep_alive, self._options = [], {}, {}
        for name, model in settings.models.items():
            if model.warm:
                served = model.target or name
                self._warm.append(Warm(served, model.replicas))
                self._keep_alive[served] = -1 if model.keep_alive is None else model.keep_alive
                self._options[served] = model.options

    def check(self) -> None:
        """Start the loads that warm models are short of (called after each probe)."""
        now = time.monotonic()
        self._resting = {k: until for k, until in self._resting.items() if until > now}
        busy = self._loading | self._resting.keys()
        changed = self._share()  # what placement below must not evict
        for backend, model in loads_wanted(self._warm, self._scheduler.backends, busy):
            self._loading.add((backend, model))
            self.loads += 1
            task = asyncio.get_running_loop().create_task(self._load(backend, model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._share() or changed:
            self._scheduler.placement_changed()

    def _share(self) -> bool:
        """Tell routing and placement what the warmer keeps and is loading, so that neither
        evicts a warm model's needed copy, nor fills the room a warm load is about to take;
        True if that changed."""
        backends = self._scheduler.backends
        before = {name: (b.loading, b.kept) for name, b in backends.items()}
        for name, backend in backends.items():
            backend.loading = {m for n, m in self._loading if n == name}
        for name, kept in kept_copies(self._warm, backends).items():  # of those loading too
            backends[name].kept = frozenset(kept)
        return any(before[name] != (b.loading, b.kept) for name, b in backends.items())

    def status(self) -> dict[str, dict[str, object]]:
        return placement(self._warm, self._scheduler.backends, self._loading)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _load(self, backend: str, model: str) -> None:
        preload: dict[str, Any] = {
            "model": model,
            "prompt": "",
            "keep_alive": self._keep_alive[model],
        }
        if self._options[model]:  # else the first request, with them, would load it again
            preload["options"] = self._options[model]
        body = orjson.dumps(preload)
        fields: dict[str, object] = {"backend": backend, "model": model}
        try:
            answer = await self._upstream(backend).send(b"POST", b"/api/generate", _JSON, body)
            try:
                await answer.read()
            finally:
                answer.release()
            fields["status"] = answer.status
        except UpstreamError as exc:
            fields["error"] = str(exc)
        finally:
            self._loading.discard((backend, model))
            if fields.get("status") == 200:
                if (known := self._scheduler.backends.get(backend)) is not None:
                    known.loaded.add(model)  # till the probe below tells the same
                log.info("warm model loaded", extra={"fields": fields})
            else:
                self._resting[backend, model] = time.monotonic() + _REST_SECONDS
                log.warning("warm model not loaded", extra={"fields": fields})
            if self._share():
                self._scheduler.placement_changed()
            self._probe_now(backend)  # what it has loaded now
