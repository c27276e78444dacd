"""Backend slots shared by every gateway that names the same Redis (`state = "redis://..."`).

Each slot a gateway uses is a lease in Redis: a member of the sorted set
`parallama:slots:<backend>|<model>`, scored by when it expires. A Lua script acquires one
atomically (expired leases swept, then a slot taken only if fewer than the backend's slots are
held), so the gateways together never run more than a backend's slots. Leases are renewed while
their requests run and given back the moment they end, with a message on
`parallama:freed` that wakes the gateways waiting for one; a gateway that dies (SIGKILL) stops
renewing, and its leases lapse after `ttl` seconds. Requests still wait in each gateway's own
queue and are bound when a lease comes (late binding), retrying every half second besides the
messages (a lapsed lease sends none).

Each round of the pump is one round trip: the leases given back since the last, and per model
as many as requests wait for. One order decides which gateway's request gets a freed slot: each
gateway, when it asks, offers its next requests (FIFO: their priority and arrival time; fair: its
next clients, whose turns are kept in Redis), and a slot goes to one of them only while more
slots are free than other gateways' offered requests that come first.
Every renewal also writes the gateway's queue and in-flight counts and reads all gateways' (the
fleet in `/parallama/status` and `/metrics`); a breaker that opens, or a "server busy" answer, in
one gateway is announced on `parallama:health` and applied by the others.

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
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from parallama.core.backends import Backend
from parallama.core.scheduler import Scheduler
from parallama.errors import ConfigError
from parallama.gateway.shared.scripts import ACQUIRE, GIVE_BACK, RENEW
from parallama.resp import UNAVAILABLE, Arg, Command, Redis, Script, owner_name

log = logging.getLogger("parallama.shared")

CHANNEL = "parallama:freed"
HEALTH = "parallama:health"
_GATEWAYS = "parallama:gateways"
_STATUSES = "parallama:statuses"
_RETRY_SECONDS = 0.5
_CLIENTS_OFFERED = 16  # fair: of this gateway's waiting clients, those whose turns are compared
_LEASES_PER_ROUND = 64  # asked for at most, per model and round trip
_HEAD_MS = 4000  # a gateway's next request stands that long unless offered again (every retry)


def slot_key(backend: str, model: str) -> str:
    return f"parallama:slots:{backend}|{model}"


def _plain(client: str) -> str:
    """A client's name without the separators of the scripts' strings."""
    return client.translate({9: 32, 10: 32, 0x1E: 32, 0x1F: 32})


def _heads(model: str) -> str:
    """Each gateway's next requests of the model (those it waits with)."""
    return f"parallama:heads:{model}"


def _order_keys(model: str) -> list[str]:
    """The model's heads, its clients' fair turns, and its current turn."""
    return [_heads(model), f"parallama:turns:{model}", f"parallama:turn:{model}"]


class SharedSlots:
    def __init__(
        self, url: str, scheduler: Scheduler, changed: Callable[[], None], ttl: float = 5.0
    ) -> None:
        """`changed` is the scheduler driver's cue (requests bound: wake them)."""
        self._url = url
        self._redis = Redis(url, timeout=2.0)
        self._scheduler = scheduler
        self._changed = changed
        self._ttl_ms = int(ttl * 1000)
        self.gateway = owner_name(self)
        self._ids = itertools.count()
        self._held: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        self._acquire, self._give_back = Script(ACQUIRE), Script(GIVE_BACK)
        self._renew = Script(RENEW)
        self._wake = asyncio.Event()
        self._pumping = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.up = True
        self._rejoin_at = 0.0  # after an outage, shared again from then on
        self.gateways = 1  # alive at the last renewal (this one included)
        self._heading: set[str] = set()  # models whose next request this gateway offered
        self._unreturned: list[tuple[str, str, str]] = []  # leases to give back next round
        # Wall-clock time of the scheduler's clock's zero: arrivals compared across hosts.
        self._epoch = time.time() - time.monotonic()
        self.acquired = 0  # leases from Redis
        self.granted = 0  # leases from Redis, or shares while it is away
        self.fleet: dict[str, dict[str, Any]] = {}  # each live gateway's status, this one's too
        self._seen: dict[str, tuple[int, float]] = {}  # backend -> breaker trips, busy until

    async def start(self) -> None:
        """Reach Redis (`ConfigError` if it cannot be reached now), then run."""
        try:
            scripts = (self._acquire, self._give_back, self._renew)
            await self._redis.execute([script.load() for script in scripts])
            await self._renew_all()
        except UNAVAILABLE as exc:
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
            with contextlib.suppress(asyncio.CancelledError, *UNAVAILABLE):
                await task
        with contextlib.suppress(*UNAVAILABLE):
            if self.up:
                await self._write([], self._unreturned + self._leases(), {}, {})  # withdrawn too
            await self._redis.call("ZREM", _GATEWAYS, self.gateway)
        await self._redis.close()

    def collector(self) -> Collector:
        return _SharedCollector(self)

    def status(self) -> dict[str, Any]:
        """The fleet in `/parallama/status`: every live gateway's queue and in flight, as each
        wrote them at its last renewal (every ttl/3)."""
        queues: Counter[str] = Counter()
        for member in self.fleet.values():
            queues.update(member.get("queues", {}))
        return {
            "shared_state_up": self.up,
            "gateway": self.gateway,
            "gateways": self.gateways,
            "queued": sum(m.get("queued", 0) for m in self.fleet.values()),
            "in_flight": sum(m.get("in_flight", 0) for m in self.fleet.values()),
            "queues": dict(queues),
            "members": self.fleet,
        }

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
            except UNAVAILABLE as exc:
                self._down(exc)
            except Exception:  # a bug must not leave every waiting request without a lease
                log.exception("shared slots: a round failed; the next one runs as usual")

    async def _pump(self) -> None:
        async with self._pumping:  # whole rounds: `stop` waits for the one under way
            await self._pump_round()

    async def _pump_round(self) -> None:
        """One round trip: news of the backends, the leases given back since the last round,
        and as many leases as requests wait for (each model's in one script call)."""
        scheduler = self._scheduler
        news, wanted, granted = self._news(), scheduler.wanted(), self.granted
        returned, self._unreturned = self._unreturned + self._leases(), []
        if not self.up:  # each gateway its share; what it gives back lapses
            for model, count in wanted.items():
                self._take_shares(model, count)
        elif asyncio.get_running_loop().time() < self._rejoin_at:
            # Just back: every gateway writes its leases again within a ttl; shares till then.
            await self._write(news, returned, {}, wanted)
            for model, count in wanted.items():
                self._take_shares(model, count)
        else:
            asked = {model: scheduler.candidates(model) for model in wanted}
            asked = {model: backends for model, backends in asked.items() if backends}
            answers = await self._write(news, returned, asked, wanted)
            for model, answer in answers.items():
                self._granted(model, asked[model], *answer)
        if self.granted != granted:
            self._changed()  # once for all: the requests bound are woken
        self._unreturned = self._leases()  # granted, but the requests left meanwhile
        if self._unreturned:
            self._wake.set()

    def _leases(self) -> list[tuple[str, str, str]]:
        """The leases the scheduler gave back: (backend, model, lease id) each."""
        leases = []
        for backend, model in self._scheduler.take_returned():
            held = self._held[backend, model]
            leases.append((backend, model, held.pop()))
            if not held:
                del self._held[backend, model]
        return leases

    def _order(self, model: str) -> str:
        """Where this gateway's next requests of a model stand among every gateway's: when
        each arrived (by the wall clock, to compare across hosts) after the higher priorities;
        or, fair, its next clients (their turns are kept in Redis, the first of them goes next)."""
        scheduler = self._scheduler
        if scheduler.settings.discipline == "fair":
            return "f:" + "\x1f".join(
                f"{_plain(t.client)}\x1e{t.weight!r}"
                for t in scheduler.next_clients(model, _CLIENTS_OFFERED)
            )
        return ",".join(
            repr(-t.priority * 1e13 + (self._epoch + t.queue_key) * 1000)
            for t in scheduler.next_tickets(model, _LEASES_PER_ROUND)
        )

    async def _write(
        self,
        news: list[bytes],
        returned: list[tuple[str, str, str]],
        asked: dict[str, list[Backend]],
        wanted: dict[str, int],
    ) -> dict[str, tuple[str, int, list[Any]]]:
        """News, leases given back, leases asked for, in one pipeline: per model asked, the
        prefix of its leases' ids, how many were asked for, and the script's answer. Models no
        longer waited for are withdrawn from the order."""
        commands: list[Command] = [["PUBLISH", HEALTH, message] for message in news]
        if returned:
            models = sorted({model for _, model, _ in returned})
            keys = [*(slot_key(b, m) for b, m, _ in returned), *map(_heads, models)]
            leases = [lease for _, _, lease in returned]
            given: list[Arg] = [len(returned), *leases, CHANNEL, self.gateway, *models]
            commands.append(self._give_back.call(keys, given))
        places = {}
        for model, backends in asked.items():
            self._heading.add(model)
            prefix = f"{self.gateway}:{next(self._ids)}"
            keys = [*(slot_key(b.name, model) for b in backends), _GATEWAYS, *_order_keys(model)]
            count = min(wanted[model], _LEASES_PER_ROUND)
            asking: list[Arg] = [self._ttl_ms, prefix, self.gateway, _HEAD_MS, self._order(model)]
            asking += [count, *(b.capacity for b in backends)]
            places[model] = prefix, count, len(commands)
            commands.append(self._acquire.call(keys, asking))
        withdrawn = self._heading - asked.keys()
        for model in withdrawn:
            commands += [["HDEL", _heads(model), self.gateway], ["PUBLISH", CHANNEL, model]]
        self._heading -= withdrawn
        results = await self._redis.execute(commands, [self._acquire, self._give_back])
        return {
            model: (prefix, count, results[at]) for model, (prefix, count, at) in places.items()
        }

    def _granted(
        self, model: str, backends: list[Backend], prefix: str, asked: int, answer: list[Any]
    ) -> None:
        alive, *grants = answer
        self.gateways = max(1, int(alive))
        for n, (index, client) in enumerate(zip(grants[::2], grants[1::2], strict=True), 1):
            self.acquired += 1
            self._grant(backends[int(index) - 1].name, model, f"{prefix}.{n}", client.decode())
        if len(grants) // 2 == asked:  # all it asked for: the script took its offer away
            self._heading.discard(model)

    def _take_shares(self, model: str, count: int) -> None:
        """Grants within this gateway's share of each backend's slots: the slots over the
        gateways last seen alive, at least one."""
        for _ in range(count):
            backend = next(
                (
                    b
                    for b in self._scheduler.candidates(model)
                    if b.in_flight[model] < max(1, b.capacity // max(1, self.gateways))
                ),
                None,
            )
            if backend is None:
                return
            self._grant(backend.name, model, f"{self.gateway}:{next(self._ids)}")

    def _grant(self, backend: str, model: str, lease: str, client: str = "") -> None:
        self._held[backend, model].append(lease)
        self._scheduler.grant(backend, model, client)
        self.granted += 1

    async def _listen(self) -> None:
        while True:
            try:
                async for channel, message in self._redis.messages(CHANNEL, HEALTH):
                    if channel == HEALTH.encode():
                        self._heard(message)
                    elif self._scheduler.wanted():
                        self._wake.set()
            except UNAVAILABLE:
                await asyncio.sleep(_RETRY_SECONDS)

    def _news(self) -> list[bytes]:
        """For the other gateways: breakers that opened here, "server busy" answers."""
        news: list[bytes] = []
        for name, backend in self._scheduler.backends.items():
            seen = self._seen.get(name, (0, 0.0))
            now = (backend.breaker.trips, backend.cap_until)
            if now == seen:
                continue
            self._seen[name] = now
            events = ["down"] if now[0] > seen[0] else []
            events += ["busy"] if now[1] > seen[1] else []
            for event in events:
                news.append(
                    orjson.dumps({"gateway": self.gateway, "backend": name, "event": event})
                )
        return news

    def _heard(self, data: bytes) -> None:
        """Another gateway's news of a backend: its breaker opens here too, or its slots are
        halved for a while (unless they already are)."""
        try:
            news = orjson.loads(data)
            name, event, sender = news["backend"], news["event"], news["gateway"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        backend = self._scheduler.backends.get(name)
        if backend is None or sender == self.gateway:
            return
        if event == "down":
            self._scheduler.trip(name)
        elif event == "busy" and backend.cap is None:
            self._scheduler.throttle(name)
        self._seen[name] = (backend.breaker.trips, backend.cap_until)  # not announced again
        self._changed()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                async with self._pumping:  # else it could write back a lease just given back
                    await self._renew_all()
            except UNAVAILABLE as exc:
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
        scheduler = self._scheduler
        status = {
            "queued": scheduler.queued,
            "in_flight": scheduler.in_flight,
            "queues": scheduler.queue_depths(),
        }
        alive, statuses = await self._redis.run(
            self._renew,
            [*keys, _GATEWAYS, _STATUSES],
            [self._ttl_ms, self.gateway, orjson.dumps(status), *leases],
        )
        self.fleet = {
            gateway.decode(): orjson.loads(raw)
            for gateway, raw in zip(statuses[::2], statuses[1::2], strict=True)
        }
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
        fleet = self._shared.status()
        yield GaugeMetricFamily(
            "parallama_fleet_queued",
            "Requests waiting in every gateway sharing the state (as of their last renewal)",
            value=fleet["queued"],
        )
        yield GaugeMetricFamily(
            "parallama_fleet_in_flight",
            "Requests every gateway sharing the state has on a backend (their last renewal)",
            value=fleet["in_flight"],
        )
        depth = GaugeMetricFamily(
            "parallama_fleet_queue_depth",
            "Requests waiting in every gateway, per model (as of their last renewal)",
            labels=["model"],
        )
        for model, count in sorted(fleet["queues"].items()):
            depth.add_metric([model], count)
        yield depth
        yield CounterMetricFamily(
            "parallama_slot_leases_acquired",
            "Slot leases this gateway acquired in Redis",
            value=self._shared.acquired,
        )
