"""Backend slots shared by every gateway that names the same Redis (`state = "redis://..."`).

Each slot a gateway uses is a lease in Redis: a member of the sorted set
`parallama:slots:<backend>|<model>`, scored by when it expires. A Lua script acquires one
atomically (expired leases swept, then a slot taken only if fewer than the backend's slots are
held), so the gateways together never run more than a backend's slots. Leases are renewed while
their requests run and given back the moment they end, with a message on
`parallama:freed` that wakes the gateways waiting for one; a gateway that dies (SIGKILL) stops
renewing, and its leases lapse after `ttl` seconds. Requests still wait in each gateway's own
queue and are bound when a lease comes (late binding); the waiting gateways race for a freed
slot, retrying every half second besides the messages (a lapsed lease sends none).

While Redis cannot be reached, each gateway keeps serving with its share of every backend's
slots (the slots over the gateways last seen alive, at least one): it starts a request only
while it runs fewer than its share, says so in the log and in `parallama_shared_state_up`, and
writes its leases again when Redis is back (restarted empty, or not), going on with its share for
one more ttl, the time every gateway takes to write its own back. Requests that were running when
Redis went away still end, so for that moment a backend may run those besides the shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from parallama.core.scheduler import Scheduler
from parallama.errors import ConfigError

log = logging.getLogger("parallama.shared")

CHANNEL = "parallama:freed"
_GATEWAYS = "parallama:gateways"
_RETRY_SECONDS = 0.5

# KEYS: the candidates' slot sets, then the gateways' set; ARGV: ttl (ms), lease id, then each
# candidate's slots. Returns the 1-based index of the candidate that gave a slot (0: none had
# room) and how many gateways are alive (so that each knows its share should Redis go away).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local alive = redis.call('ZCOUNT', KEYS[#KEYS], now, '+inf')
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) < tonumber(ARGV[2 + i]) then
    redis.call('ZADD', key, now + ttl, ARGV[2])
    redis.call('PEXPIRE', key, ttl * 4)
    return {i, alive}
  end
end
return {0, alive}
"""
# KEYS: slot sets, one per lease, then the gateways' set; ARGV: ttl (ms), this gateway's id,
# then the lease ids. Renews (or writes again, after Redis lost them) the leases and the
# gateway's heartbeat; returns how many gateways are alive.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local gateways = KEYS[#KEYS]
for i = 1, #KEYS - 1 do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[2 + i])
  redis.call('PEXPIRE', KEYS[i], ttl * 4)
end
redis.call('ZADD', gateways, now + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
return redis.call('ZCARD', gateways)
"""


def slot_key(backend: str, model: str) -> str:
    return f"parallama:slots:{backend}|{model}"


class SharedSlots:
    def __init__(
        self, url: str, scheduler: Scheduler, changed: Callable[[], None], ttl: float = 5.0
    ) -> None:
        """`changed` is the scheduler driver's cue (requests bound: wake them)."""
        self._url = url
        self._redis: aioredis.Redis = aioredis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._scheduler = scheduler
        self._changed = changed
        self._ttl_ms = int(ttl * 1000)
        self.gateway = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._ids = itertools.count()
        self._held: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._wake = asyncio.Event()
        self._pumping = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.up = True
        self._rejoin_at = 0.0  # after an outage, shared again from then on
        self.gateways = 1  # alive at the last renewal (this one included)
        self.acquired = 0

    async def start(self) -> None:
        """Reach Redis (`ConfigError` if it cannot be reached now), then run."""
        try:
            await self._redis.ping()
            await self._renew_all()
        except (RedisError, OSError) as exc:
            raise ConfigError(f"state {self._url}: cannot reach Redis: {exc}") from None
        self._tasks = [
            asyncio.create_task(self._pump_forever(), name="parallama-shared-slots"),
            asyncio.create_task(self._listen(), name="parallama-shared-listen"),
            asyncio.create_task(self._renew_forever(), name="parallama-shared-renew"),
        ]

    async def stop(self) -> None:
        async with self._pumping:  # no lease taken in Redis and then forgotten
            for task in self._tasks:
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self._give_back(self._scheduler.take_returned())
            await self._redis.zrem(_GATEWAYS, self.gateway)
        await self._redis.aclose()

    def collector(self) -> Collector:
        return _SharedCollector(self)

    def changed(self) -> None:
        """The scheduler moved: leases may be wanted, or given back."""
        self._wake.set()

    # -- the work ---------------------------------------------------------------------------------

    async def _pump_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RETRY_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._pump()
            except (RedisError, OSError) as exc:
                self._down(exc)
            except Exception:  # a bug must not leave every waiting request without a lease
                log.exception("shared slots: a round failed; the next one runs as usual")

    async def _pump(self) -> None:
        async with self._pumping:  # whole rounds: `stop` waits for the one under way
            await self._pump_round()

    async def _pump_round(self) -> None:
        scheduler = self._scheduler
        await self._give_back(scheduler.take_returned())
        for model, wanted in scheduler.wanted().items():
            for _ in range(wanted):
                if not await self._take_one(model):
                    break
        await self._give_back(scheduler.take_returned())  # granted, but nobody took them

    async def _take_one(self, model: str) -> bool:
        scheduler = self._scheduler
        candidates = scheduler.candidates(model)
        if not candidates:
            return False
        if not self.up or asyncio.get_running_loop().time() < self._rejoin_at:
            # Redis away, or just back (every gateway writes its leases again within a ttl):
            # this gateway's share of each backend's slots.
            for backend in candidates:
                share = max(1, backend.capacity // max(1, self.gateways))
                if backend.in_flight[model] < share:
                    self._grant(backend.name, model, f"{self.gateway}:{next(self._ids)}")
                    return True
            return False
        lease = f"{self.gateway}:{next(self._ids)}"
        keys = [slot_key(b.name, model) for b in candidates]
        slots = [b.capacity for b in candidates]
        got, alive = await self._acquire(
            keys=[*keys, _GATEWAYS], args=[self._ttl_ms, lease, *slots]
        )
        self.gateways = max(1, int(alive))
        if not got:
            return False
        self.acquired += 1
        self._grant(candidates[int(got) - 1].name, model, lease)
        return True

    def _grant(self, backend: str, model: str, lease: str) -> None:
        self._held[backend, model].append(lease)
        self._scheduler.grant(backend, model)
        self._changed()

    async def _give_back(self, returned: list[tuple[str, str]]) -> None:
        if not returned:
            return
        pipe = self._redis.pipeline(transaction=False)
        for backend, model in returned:
            lease = self._held[backend, model].pop()
            if not self._held[backend, model]:
                del self._held[backend, model]
            pipe.zrem(slot_key(backend, model), lease)
            pipe.publish(CHANNEL, f"{backend}|{model}")
        if self.up:  # else it lapses: it is no longer renewed
            await pipe.execute()

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message" and self._scheduler.wanted():
                            self._wake.set()
            except (RedisError, OSError):
                await asyncio.sleep(_RETRY_SECONDS)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                async with self._pumping:  # else it could write back a lease just given back
                    await self._renew_all()
            except (RedisError, OSError) as exc:
                self._down(exc)

    async def _renew_all(self) -> None:
        """The heartbeat, and every lease in use written again: renewed, or (Redis restarted
        empty, or back after an outage) put back."""
        keys: list[str] = []
        leases: list[Any] = []
        for (backend, model), held in list(self._held.items()):
            for lease in held:
                keys.append(slot_key(backend, model))
                leases.append(lease)
        alive = await self._renew(
            keys=[*keys, _GATEWAYS], args=[self._ttl_ms, self.gateway, *leases]
        )
        rejoining = not self.up or asyncio.get_running_loop().time() < self._rejoin_at
        # Just back, the others may not have written their heartbeat yet: fewer alive is
        # believed only after a ttl, not to take a larger share too soon.
        self.gateways = max(self.gateways, int(alive)) if rejoining else int(alive)
        if not self.up:
            log.info("shared state: Redis reachable again; slots shared once more in a ttl")
            self.up = True
            self._rejoin_at = asyncio.get_running_loop().time() + self._ttl_ms / 1000
            self._wake.set()

    def _down(self, exc: BaseException) -> None:
        if self.up:
            log.warning(
                "shared state: Redis unreachable; serving with this gateway's share of slots",
                extra={
                    "fields": {"error": str(exc) or type(exc).__name__, "gateways": self.gateways}
                },
            )
        self.up = False


class _SharedCollector(Collector):
    """Slots shared through Redis: whether it answers, and how many gateways share them."""

    def __init__(self, shared: SharedSlots) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "parallama_shared_state_up",
            "1 while Redis answers; 0: serving with this gateway's share of each backend's slots",
            value=1 if self._shared.up else 0,
        )
        yield GaugeMetricFamily(
            "parallama_gateways_alive",
            "Gateways sharing the backends' slots, this one included, at the last renewal",
            value=self._shared.gateways,
        )
        yield CounterMetricFamily(
            "parallama_slot_leases_acquired",
            "Slot leases this gateway acquired in Redis",
            value=self._shared.acquired,
        )
