"""The backends as the gateway's I/O sees them: a connection pool each, the probes, and
reconfiguration while requests are flowing.

The scheduler holds what routing needs to know of each backend (slots, health, models, load);
this holds the rest, and keeps the two in step when the settings change: a new backend gets a
pool and probes, a removed one takes no new work while its requests in flight finish on their
connections, a changed one keeps its breaker and its load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from parallama.config import BackendSettings, GatewaySettings
from parallama.core.adaptive import SlotTuner
from parallama.core.backends import Backend
from parallama.core.breaker import Breaker
from parallama.core.scheduler import Scheduler
from parallama.gateway.fleet.occupancy import OccupancyProbe
from parallama.gateway.fleet.probes import Prober
from parallama.gateway.fleet.warming import Warmer
from parallama.gateway.http.upstream import Upstream, UpstreamError
from parallama.protocol.inspect import Dialect

log = logging.getLogger("parallama.gateway")


class Fleet:
    def __init__(
        self, scheduler: Scheduler, settings: GatewaySettings, on_change: Callable[[], None]
    ) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._on_change = on_change
        self.upstreams: dict[str, Upstream] = {}
        self._dialects = {b.url: b.kind for b in settings.backends}
        self._prober: Prober | None = None
        self.occupancy: OccupancyProbe | None = None
        self._probing: set[asyncio.Task[None]] = set()  # probe_now's, held until they end
        self.warmer = Warmer(scheduler, self.upstream, self.probe_now)
        self.warmer.apply(settings)
        for backend in settings.backends:
            scheduler.add_backend(self._new_backend(backend))

    async def start(self) -> None:
        """Open for business: pools (they need the running loop) and probes."""
        for backend in self._settings.backends:
            self.upstreams[backend.url] = self._new_upstream(backend.url)
        self._prober = Prober(
            self._scheduler,
            self.upstreams,
            dialect=self.dialect,
            interval=self._settings.health_interval,
            timeout=self._settings.health_timeout,
            on_change=self._probed,
        )
        self._prober.start()
        self.occupancy = OccupancyProbe(
            self._scheduler,
            self.upstreams,
            self.settings_of,
            interval=self._settings.occupancy_interval,
            timeout=self._settings.health_timeout,
        )
        self.occupancy.start()

    def settings_of(self, url: str) -> BackendSettings | None:
        return next((b for b in self._settings.backends if b.url == url), None)

    def _probed(self) -> None:
        """A backend was probed: warm models it is short of are loaded, and the scheduler's
        driver is told."""
        self.warmer.check()
        self._on_change()

    def upstream(self, url: str) -> Upstream:
        """The backend's pool; `UpstreamError` if it was removed from the settings meanwhile."""
        upstream = self.upstreams.get(url)
        if upstream is None:
            raise UpstreamError("was removed", reached=False)
        return upstream

    def probe_now(self, url: str) -> None:
        """Look at a backend now rather than at its next health check (it has just started)."""
        if self._prober is not None:
            task = asyncio.get_running_loop().create_task(self._prober.probe(url))
            self._probing.add(task)
            task.add_done_callback(self._probing.discard)

    def set_online(self, url: str, online: bool, *, standby: bool = False) -> None:
        """The engine process behind `url` started serving (probed at once) or stopped; while
        it is offline, requests wait for it if it is on `standby` (autoscaling starts it)."""
        self._scheduler.set_standby(url, standby)
        self._scheduler.set_online(url, online)
        if online:
            self.probe_now(url)
        self._on_change()

    def dialect(self, url: str) -> Dialect:
        return self._dialects.get(url, "ollama")

    def serves(self, url: str, route: str) -> bool:
        """Whether the backend was found to serve `route` (`probes.ROUTE_SINCE`); until it is
        known, no: every engine serves `/v1/chat/completions`, which can do the route's work."""
        return self._prober is not None and route in self._prober.routes.get(url, ())

    def digest(self, url: str, model: str) -> str | None:
        """The model's digest at that Ollama as its last listing said; None if unknown."""
        return None if self._prober is None else self._prober.digests.get(url, {}).get(model)

    def ollama_version(self) -> tuple[int, int, int] | None:
        """The lowest version among the healthy Ollama backends: what a client can count on
        whichever of them answers it. None when there are none."""
        backends = self._scheduler.backends
        versions = [
            version
            for url, version in (self._prober.versions.items() if self._prober else ())
            if url in backends and backends[url].healthy
        ]
        return min(versions, default=None)

    async def stop(self) -> None:
        if self._prober is not None:
            await self._prober.stop()
        if self.occupancy is not None:
            await self.occupancy.stop()
        for task in list(self._probing):
            task.cancel()
        await asyncio.gather(*self._probing, return_exceptions=True)
        await self.warmer.stop()
        for upstream in self.upstreams.values():
            await upstream.close()

    def apply(self, settings: GatewaySettings) -> list[str]:
        """Take new settings without dropping a request; return what changed, for the log."""
        old = {b.url: b for b in self._settings.backends}
        new = {b.url: b for b in settings.backends}
        self._settings = settings
        self._dialects = {b.url: b.kind for b in settings.backends}
        self._scheduler.settings = settings.scheduler
        self.warmer.apply(settings)
        changes = []
        for url in old.keys() - new.keys():
            self._scheduler.remove_backend(url)
            self.upstreams.pop(url).retire()  # connections close as their requests end
            changes.append(f"removed {url}")
        for url, wanted in new.items():
            backend = self._scheduler.backends.get(url)
            if backend is None:
                self._scheduler.add_backend(self._new_backend(wanted))
                self.upstreams[url] = self._new_upstream(url)
                changes.append(f"added {url}")
                continue
            if wanted != old[url]:
                changes.append(f"changed {url}")
            if wanted.slots != "auto":
                backend.tuner = None
                backend.slots = settings.slots_of(wanted)
            elif backend.tuner is None or (backend.tuner.low, backend.tuner.high) != (
                wanted.min_slots,
                wanted.max_slots,
            ):  # learned anew; else what was learned stays
                backend.tuner = SlotTuner(wanted.min_slots, wanted.max_slots)
                backend.slots = backend.tuner.limit
            backend.weight = wanted.weight
            backend.room = wanted.max_loaded_models
            backend.models = wanted.models
            backend.cache_rule = wanted.prompt_cache
            backend.cache_ram = wanted.prompt_cache_ram
            backend.breaker.threshold = settings.failure_threshold
            backend.breaker.cooldown = settings.breaker_cooldown
            self._scheduler.set_draining(url, wanted.drain)
            upstream = self.upstreams[url]
            upstream.connect_timeout = settings.connect_timeout
            upstream.read_timeout = settings.request_timeout
            upstream.max_idle = self._idle_cap(url)
        if self._prober is not None:
            self._prober.interval = settings.health_interval
            self._prober.timeout = settings.health_timeout
        if self.occupancy is not None:
            self.occupancy.interval = settings.occupancy_interval
            self.occupancy.timeout = settings.health_timeout
        self._on_change()
        return changes

    def _new_backend(self, backend: BackendSettings) -> Backend:
        s = self._settings
        return Backend(
            backend.url,
            slots=s.slots_of(backend),
            tuner=SlotTuner(backend.min_slots, backend.max_slots)
            if backend.slots == "auto"
            else None,
            weight=backend.weight,
            room=backend.max_loaded_models,
            models=backend.models,
            draining=backend.drain,
            breaker=Breaker(s.failure_threshold, s.breaker_cooldown),
            cache_rule=backend.prompt_cache,
            cache_ram=backend.prompt_cache_ram,
        )

    def _new_upstream(self, url: str) -> Upstream:
        # Like nginx's proxy_read_timeout: a backend may be silent this long, before its first
        # byte or between two chunks; a stream that keeps flowing may take as long as it needs.
        return Upstream(
            url,
            connect_timeout=self._settings.connect_timeout,
            read_timeout=self._settings.request_timeout,
            max_idle=self._idle_cap(url),
        )

    def _idle_cap(self, url: str) -> int:
        """Connections kept idle to a backend: what it serves at once (its slots, for each
        model it may hold), and two for the probes. More would only hold an engine's few HTTP
        threads (llama-server sizes them from its CPUs) for nothing."""
        backend = self._scheduler.backends[url]
        slots = backend.slots if backend.tuner is None else backend.tuner.high
        return slots * (backend.room or 1) + 2
