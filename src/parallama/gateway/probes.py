"""Active probes: every backend's health, installed models and loaded models, on an interval.

Passive signs (a refused connection, a reset, a 5xx) reach the circuit breakers from real
requests; the probes find a dead backend that gets no traffic, give an open breaker its trial
when no request comes, and keep each backend's inventory (`/api/tags`, or `/v1/models` for an
OpenAI-dialect engine) and loaded models (`/api/ps`) fresh for routing. Each model an Ollama
loads is looked up once (`/api/show`) for its KV cache per token, which tells prefix affinity how
many of its prompts the engine's host-RAM cache holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from parallama.core.router import MAX_KV_MODELS
from parallama.core.scheduler import Scheduler
from parallama.gateway.upstream import Upstream
from parallama.protocol.inspect import Dialect
from parallama.protocol.ollama import kv_bytes_per_token, normalize_name
from parallama.runtime import cancelled

log = logging.getLogger("parallama.probes")


class Prober:
    def __init__(
        self,
        scheduler: Scheduler,
        upstreams: Mapping[str, Upstream],
        *,
        dialect: Callable[[str], Dialect],
        interval: float,
        timeout: float,
        on_change: Callable[[], None],
    ) -> None:
        self._scheduler = scheduler
        self._upstreams = upstreams  # live: reconfiguration changes it
        self._dialect = dialect
        self.interval = interval
        self.timeout = timeout
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._shown: set[str] = set()  # models looked up with /api/show

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancelled(self._task)

    async def probe_all(self) -> None:
        """Every backend but those whose engine `parallama up` knows is not serving: whatever
        answers on such a port meanwhile is not the engine, and it gets probed once it serves."""
        names = self._scheduler.online(self._upstreams)
        await asyncio.gather(*(self.probe(name) for name in names))

    async def probe(self, name: str) -> None:
        """Ask one backend how it is; tell the scheduler what it learnt."""
        upstream = self._upstreams.get(name)
        if upstream is None:  # removed meanwhile
            return
        alive = await self._alive(upstream)
        backend = self._scheduler.backends.get(name)
        if backend is None:  # removed meanwhile
            return
        if alive != backend.healthy:
            log.warning("backend probe", extra={"fields": {"backend": name, "alive": alive}})
        self._scheduler.report(name, alive)
        running: list[str] | None = None
        if alive:
            installed, running = await self._models(upstream, self._dialect(name))
            if name in self._scheduler.backends:
                if installed is not None:
                    self._scheduler.set_inventory(name, installed)
                if running is not None:
                    self._scheduler.set_loaded(name, running)
        self._on_change()
        if running and self._dialect(name) == "ollama":  # after: no probe round waits for it
            await self._look_up(upstream, running)

    async def _run(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.interval)

    async def _models(
        self, upstream: Upstream, dialect: Dialect
    ) -> tuple[list[str] | None, list[str] | None]:
        """Installed and loaded models; None where the answer told nothing. An OpenAI-dialect
        engine lists only what it serves, and keeps it loaded."""
        if dialect == "openai":
            served = _names(await upstream.get_json(b"/v1/models", self.timeout), "data", "id")
            return served, served
        tags = await upstream.get_json(b"/api/tags", self.timeout)
        loaded = await upstream.get_json(b"/api/ps", self.timeout)
        return _names(tags, "models", "name"), _names(loaded, "models", "name")

    async def _look_up(self, upstream: Upstream, models: list[str]) -> None:
        """Each model not looked up yet: its KV cache per token, from its `model_info`; asked
        again at the next probe if no answer came."""
        for model in models:
            if model in self._shown or len(self._shown) >= MAX_KV_MODELS:
                continue
            shown = await upstream.post_json(b"/api/show", {"model": model}, self.timeout)
            if not isinstance(shown, dict):
                continue
            self._shown.add(model)
            per_token = kv_bytes_per_token(shown.get("model_info"))
            if per_token is not None:
                self._scheduler.learn_kv_bytes(model, per_token)

    async def _alive(self, upstream: Upstream) -> bool:
        """Any answer below 500, in time: even a 404 (an engine without Ollama's routes)."""
        status, _ = await upstream.get(b"/api/version", self.timeout)
        return 0 < status < 500


def _names(answer: Any, list_key: str, name_key: str) -> list[str] | None:
    """The names in `answer[list_key]`; None if the answer is not such a list at all (an engine
    that answers every path alike tells us nothing about its models)."""
    rows = answer.get(list_key) if isinstance(answer, dict) else None
    if not isinstance(rows, list):
        return None
    return [
        normalize_name(row[name_key])
        for row in rows
        if isinstance(row, dict) and isinstance(row.get(name_key), str)
    ]
