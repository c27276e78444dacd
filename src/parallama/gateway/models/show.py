"""`POST /api/show` over the fleet, answered at once: it runs no generation, so it never waits
for a slot (editors and agents ask it before every session, for the context length and whether
tools and vision are there, and turn features off when it fails or is slow).

Asked of a healthy backend that has the model: an Ollama's own answer, kept by the model's
digest (a model pulled again has another); for an OpenAI-dialect engine, built from what it
tells (its `/v1/models` row, llama-server's `/props`) and kept a little while. What is kept is
bounded in bytes, and keyed by what the backends said, never by what a client sent.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable

import orjson

from parallama.core.scheduler import Scheduler
from parallama.gateway.fleet.backends import Fleet
from parallama.gateway.http.upstream import Upstream
from parallama.protocol import ollama
from parallama.protocol.ollama import normalize_name

CACHE_BYTES = 8 * 2**20  # all answers kept together
ENTRY_BYTES = 2**20  # a larger answer (verbose: the whole vocabulary) is not kept
BUILT_SECONDS = 30.0  # an engine restarted with another context size is told within this


class ByteBoundedCache:
    """Least recently used answers, at most `limit` bytes of them; each may expire."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self._limit = limit
        self._size = 0
        self._entries: OrderedDict[Hashable, tuple[float, bytes]] = OrderedDict()

    def get(self, key: Hashable, now: float) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Hashable, value: bytes, expires: float = float("inf")) -> None:
        if len(value) > min(ENTRY_BYTES, self._limit):
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (expires, value)
        self._size += len(value)
        while self._size > self._limit:
            self._drop(next(iter(self._entries)))

    @property
    def size(self) -> int:
        return self._size

    def _drop(self, key: Hashable) -> None:
        self._size -= len(self._entries.pop(key)[1])


class ModelCards:
    """Each model's `/api/show` answer, from the fleet."""

    def __init__(self, scheduler: Scheduler, fleet: Fleet, timeout: float) -> None:
        self._scheduler = scheduler
        self._fleet = fleet
        self.timeout = timeout  # replaced on reload
        self.cache = ByteBoundedCache()

    async def answer(self, model: str, body: bytes) -> tuple[int, bytes] | None:
        """Status and body: the first backend with the model that answers, Ollamas first (their
        answer is the model's own), else the last refusal given; None where none has it."""
        asked = orjson.loads(body)
        verbose = asked.get("verbose") is True
        fleet = self._fleet
        having = [b.name for b in self._scheduler.backends.values() if b.serves(model)]
        having.sort(key=lambda name: fleet.dialect(name) != "ollama")
        refused: tuple[int, bytes] | None = None
        for name in having:
            upstream = fleet.upstreams.get(name)
            if upstream is None:  # removed meanwhile
                continue
            if fleet.dialect(name) == "ollama":
                status, whole = await self._from_ollama(upstream, name, model, verbose, asked)
            else:
                status, whole = await self._built(upstream, name, model)
            if status == 200:
                return status, whole
            if status not in (0, 404):  # the backend's own say: a bad request stays one
                refused = status, whole
        return refused

    async def _from_ollama(
        self, upstream: Upstream, name: str, model: str, verbose: bool, asked: object
    ) -> tuple[int, bytes]:
        digest = self._fleet.digest(name, model)
        key = ("ollama", digest, verbose)
        now = time.monotonic()
        if digest is not None and (kept := self.cache.get(key, now)) is not None:
            return 200, kept
        status, whole = await upstream.post(b"/api/show", asked, self.timeout)
        if status == 200 and digest is not None:
            self.cache.put(key, whole)
        return status, whole

    async def _built(self, upstream: Upstream, name: str, model: str) -> tuple[int, bytes]:
        key = ("openai", name, model)
        now = time.monotonic()
        if (kept := self.cache.get(key, now)) is not None:
            return 200, kept
        listing = await upstream.get_json(b"/v1/models", self.timeout)
        rows = listing.get("data") if isinstance(listing, dict) else None
        row = next((r for r in rows or () if _row_id(r) == model), None)
        if row is None:
            return 404, b""
        props = await upstream.get_json(b"/props", self.timeout)  # llama-server's; else None
        whole = orjson.dumps(ollama.shown_model(row, props))
        self.cache.put(key, whole, now + BUILT_SECONDS)
        return 200, whole


def _row_id(row: object) -> str | None:
    """A `/v1/models` row's model, named as the scheduler names it."""
    if isinstance(row, dict) and isinstance(row.get("id"), str):
        return normalize_name(row["id"])
    return None
