"""Active probes: every backend's health, installed models and loaded models, on an interval.

Passive signs (a refused connection, a reset, a 5xx) reach the circuit breakers from real
requests; the probes find a dead backend that gets no traffic, give an open breaker its trial
when no request comes, and keep each backend's inventory (`/api/tags`, or `/v1/models` for an
OpenAI-dialect engine) and loaded models (`/api/ps`) fresh for routing. Each model an Ollama
loads is looked up once (`/api/show`) for its KV cache per token, which tells prefix affinity how
many of its prompts the engine's host-RAM cache holds.

Which of the routes an engine may lack (`/v1/messages`, `/v1/responses`) each backend serves is
found, never assumed from its name: an Ollama's from the version it reports, any other engine's
by asking the route once with an empty request (a 404 or 405: it has no such route).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from parallama.core.router import MAX_KV_MODELS
from parallama.core.scheduler import Scheduler
from parallama.gateway.http.upstream import Upstream
from parallama.protocol.inspect import Dialect
from parallama.protocol.ollama import (
    ROUTE_SINCE,
    kv_bytes_per_token,
    normalize_name,
    parse_version,
    routes_since,
)
from parallama.runtime import cancelled

log = logging.getLogger("parallama.probes")
# What a non-Ollama engine is asked whether it serves (Ollama counts no tokens).
ENGINE_ROUTES = (*ROUTE_SINCE, "/v1/messages/count_tokens")


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
        self.versions: dict[str, tuple[int, int, int]] = {}  # each Ollama's, as it says
        self.routes: dict[str, frozenset[str]] = {}  # of ROUTE_SINCE, what each serves
        # Each Ollama's models' digests, from its /api/tags: what a cached /api/show is keyed by.
        self.digests: dict[str, dict[str, str]] = {}

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
        status, version = await upstream.get(b"/api/version", self.timeout)
        alive = 0 < status < 500  # any answer in time, even a 404 (no Ollama routes)
        backend = self._scheduler.backends.get(name)
        if backend is None:  # removed meanwhile
            return
        await self._learn_routes(name, upstream, version if alive else None)
        if alive != backend.healthy:
            log.warning("backend probe", extra={"fields": {"backend": name, "alive": alive}})
        self._scheduler.report(name, alive)
        running: list[str] | None = None
        if alive:
            installed, running = await self._models(name, upstream, self._dialect(name))
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
        self, name: str, upstream: Upstream, dialect: Dialect
    ) -> tuple[list[str] | None, list[str] | None]:
        """Installed and loaded models; None where the answer told nothing. An OpenAI-dialect
        engine lists only what it serves, and keeps it loaded."""
        if dialect == "openai":
            served = _names(await upstream.get_json(b"/v1/models", self.timeout), "data", "id")
            return served, served
        tags = await upstream.get_json(b"/api/tags", self.timeout)
        loaded = await upstream.get_json(b"/api/ps", self.timeout)
        installed = _names(tags, "models", "name")
        if installed is not None:
            rows = tags["models"]
            self.digests[name] = {
                normalize_name(row["name"]): row["digest"]
                for row in rows
                if isinstance(row, dict)
                and isinstance(row.get("name"), str)
                and isinstance(row.get("digest"), str)
            }
        return installed, _names(loaded, "models", "name")

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

    async def _learn_routes(self, name: str, upstream: Upstream, version: bytes | None) -> None:
        """What of `ROUTE_SINCE` the backend serves: forgotten while it is down (it may come
        back as another release), asked of a non-Ollama engine only until it answers."""
        if version is None:
            self.versions.pop(name, None)
            self.routes.pop(name, None)
            self.digests.pop(name, None)
            return
        if self._dialect(name) == "ollama":
            said = parse_version(_field(version, "version"))
            if said is not None:
                self.versions[name] = said
                self.routes[name] = routes_since(said)
            return
        if name in self.routes:
            return
        served = set()
        for route in ENGINE_ROUTES:
            status, _ = await upstream.post(route.encode(), {}, self.timeout)
            if status == 0:
                return  # no answer: asked again at the next probe
            if status not in (404, 405):
                served.add(route)
        self.routes[name] = frozenset(served)


def _field(body: bytes, key: str) -> Any:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return answer.get(key) if isinstance(answer, dict) else None


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
