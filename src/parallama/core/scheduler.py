"""The gateway's scheduler: waiting queues, admission and late-binding dispatch (sans-I/O).

A request waits in the gateway, in its model's queue, and is bound to a backend only when one of
that backend's slots for the model is free (late binding): a slow backend never collects a
private queue, so one slow GPU does not inflate everyone's p99. Which of the candidates wins is
the routing policy's choice (`router.py`); the default picks the least loaded relative to its
capacity and weight, preferring backends that already have the model loaded (no load time).

Each backend has a circuit breaker (`breaker.py`) fed by request outcomes and probes, a model
inventory and the set of loaded models (both from probes), and may be draining (no new work).

Every request ends in exactly one outcome, and at any moment
`total == completed + rejected + timed_out + cancelled + failed + in_flight + queued`.

Nothing here does I/O or reads a clock of its own: the driver calls `submit`, `cancel`,
`release` and `tick`, then collects `take_dispatched()` and `take_timed_out()`, and calls `tick`
again at `next_wakeup()`.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from parallama.core.adaptive import SlotTuner
from parallama.core.breaker import Breaker, BreakerState
from parallama.core.kv_slots import CacheRule
from parallama.core.prefixes import Blocks
from parallama.core.router import Policy, Router

Clock = Callable[[], float]
Discipline = Literal["fifo", "fair"]
LOOKAHEAD = 8  # prefix affinity: waiting requests looked at for a freed slot


class Outcome(enum.Enum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    FAILED = "failed"


class QueueFullError(Exception):
    """Admission refused: the queue (global or the model's) is full."""

    def __init__(self, scope: str, retry_after: float) -> None:
        super().__init__(f"{scope} queue is full")
        self.scope = scope
        self.retry_after = retry_after


class DeadlineError(Exception):
    """The wait expected for the request already exceeds the deadline it came with."""

    def __init__(self, expected: float, deadline: float, retry_after: float) -> None:
        wait = f"{expected:.1f} s"
        super().__init__(
            f"the expected wait of {wait} exceeds the request's deadline of {deadline:g} s"
        )
        self.retry_after = retry_after


class NoBackendError(Exception):
    """No backend has or may serve the model: waiting would never end."""


class UnavailableError(Exception):
    """Backends serve the model, but none is healthy and taking work now."""

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"no healthy backend serves model '{model}'")
        self.retry_after = retry_after


@dataclass(eq=False, slots=True)
class Ticket:
    model: str
    client: str
    priority: int
    arrived_at: float
    seq: int
    session: str = ""  # for session affinity
    prefix: Blocks = ()  # its prompt's block hashes, for prefix affinity
    weight: float = 1.0  # its client's share in the fair discipline (an API key's priority)
    backend: Backend | None = None
    dispatched_at: float | None = None
    outcome: Outcome | None = None
    avoid: frozenset[str] = frozenset()  # backends it failed on
    waited: float = 0.0  # seconds in the queue before its latest wait, summed over requeues
    queued_since: float | None = None  # when its current wait began; None while bound
    skipped: int = 0  # times a later request was bound before it (prefix affinity)
    concurrency: int = 0  # requests of its model on its backend once it was sent there
    prefix_slot: int = -1  # prefix affinity: its slot in its backend's memory, until released
    size: int = 0  # bytes it holds while it waits: its body

    def __post_init__(self) -> None:
        self.queued_since = self.arrived_at

    @property
    def queued(self) -> bool:
        return self.backend is None and self.outcome is None

    @property
    def queue_key(self) -> float:
        """When it would have arrived had it waited all its queue time in one go: its queue
        timeout falls `queue_timeout` after this, whatever it spent on backends that failed."""
        assert self.queued_since is not None
        return self.queued_since - self.waited

    def queue_seconds(self, now: float) -> float:
        """Time spent waiting in the gateway's queue, over all its waits: not the time spent
        on a backend that failed before it was requeued."""
        current = 0.0 if self.queued_since is None else now - self.queued_since
        return self.waited + current

    def stop_waiting(self, now: float) -> None:
        if self.queued_since is not None:
            self.waited += now - self.queued_since
            self.queued_since = None


@dataclass(eq=False)
class Backend:
    """What the scheduler knows of one backend: capacity, health, load, models."""

    name: str
    slots: int = 1  # per model, like OLLAMA_NUM_PARALLEL
    weight: float = 1.0
    models: frozenset[str] | None = None  # configured: the only models sent here; None: any
    room: int | None = None  # models it keeps loaded at once, if known (model affinity)
    inventory: frozenset[str] | None = None  # installed, from its /api/tags; None: unknown
    loaded: set[str] = field(default_factory=set)
    loading: set[str] = field(default_factory=set)  # warm loads started, not yet seen loaded
    kept: frozenset[str] = frozenset()  # warm models: kept loaded, never to make way for others
    in_flight: Counter[str] = field(default_factory=Counter)
    breaker: Breaker = field(default_factory=Breaker)
    draining: bool = False
    online: bool = True  # False while the engine process behind it is not serving (`up`)
    standby: bool = False  # offline, but started when work waits (autoscaling): worth a wait
    last_release: float = -math.inf  # when a request last left it (autoscaling's idle time)
    outside: int = 0  # slots busy with requests that did not come through this gateway
    cache_rule: CacheRule = "llama-server"  # whose rules its prompt cache follows (prefix affinity)
    cache_ram: int = 8192  # MiB of host-RAM prompt cache (llama-server's rule)
    tuner: SlotTuner | None = None  # slots learned (`slots = "auto"`): its limit is `slots`
    cap: int | None = None  # fewer slots per model, for a while, after it said "server busy"
    cap_until: float = 0.0
    # Slots shared with other gateways: the leases this one holds per model (None: not shared).
    leased: Counter[str] | None = None

    @property
    def healthy(self) -> bool:
        return self.breaker.state is not BreakerState.OPEN

    @property
    def capacity(self) -> int:
        return self.slots if self.cap is None else min(self.slots, self.cap)

    @property
    def active(self) -> int:
        return sum(self.in_flight.values())

    def offers(self, model: str) -> bool:
        """Allowed and installed (as far as known), healthy or not."""
        return (self.models is None or model in self.models) and (
            self.inventory is None or model in self.inventory
        )

    def serves(self, model: str) -> bool:
        return self.healthy and self.online and not self.draining and self.offers(model)

    def awaits(self, model: str) -> bool:
        """Serves the model, or will once its engine has started: a request may wait for it."""
        return self.serves(model) or (self.standby and not self.draining and self.offers(model))

    def held(self) -> set[str]:
        """The models it has loaded, is loading, or runs."""
        return self.loaded | self.loading | {m for m, n in self.in_flight.items() if n}

    def idle(self) -> set[str]:
        """The models it has loaded that run nothing and are not being loaded again: those a
        load may evict without waiting."""
        return {m for m in self.loaded if not self.in_flight[m]} - self.loading

    def has_free_slot(self, model: str) -> bool:
        if self.breaker.state is BreakerState.HALF_OPEN and self.active:
            return False  # one trial request at a time
        if self.leased is not None and self.in_flight[model] >= self.leased[model]:
            return False  # shared: a slot of its own only with a lease on it
        return self.in_flight[model] + self.outside < self.capacity

    def load(self) -> float:
        """Busy share of its capacity, scaled by weight: lower is better."""
        return (self.active + self.outside) / (self.slots * self.weight)


@dataclass(frozen=True)
class SchedulerSettings:
    max_queue: int = 1024  # all models together
    max_queue_bytes: int = 256 * 2**20  # of the bodies waiting, all models together
    max_queue_per_model: int = 512
    queue_timeout: float = 60.0
    discipline: Discipline = "fifo"
    routing: Policy = "least-loaded"
    routing_by_model: Mapping[str, Policy] = field(default_factory=dict)
    busy_seconds: float = 30.0  # how long a "server busy" answer halves a backend's slots
    prefix_balance: float = 0.5  # prefix affinity: how much busier (share of its capacity) a
    # backend holding the prefix may be than the least loaded one, and still be chosen
    prefix_wait: float = 0.0  # prefix affinity: the share of a prompt running elsewhere, beyond
    # what a free slot holds, worth following there, waiting if need be (0: never)
    # Slots shared with other gateways (`state = "redis://..."`): a request is bound only to a
    # slot this gateway holds a lease on; the driver acquires leases for what waits (`wanted`,
    # `grant`) and gives back those freed (`take_returned`).
    shared_slots: bool = False


class _Client:
    """One client's waiting requests in a fair queue, and when its next turn falls."""

    __slots__ = ("heap", "turn")

    def __init__(self, turn: float) -> None:
        self.heap: list[tuple[int, int, Ticket]] = []  # (-priority, seq, ticket)
        self.turn = turn


class _ModelQueue:
    """One model's waiting requests: by priority, then FIFO; or, fair, in turns over clients.

    Fair turns are stride scheduling: each client's next turn falls `1 / weight` after its
    last, on a virtual clock that is the turn last taken. A client of weight 2 so gets two
    turns for each of a weight-1 client, however many requests either sends; a client that
    starts waiting (new, or back after a pause) is placed one stride after the turn last
    taken, as if it had just had one: no credit saved up, and no turn ahead of those already
    due. (Placed at the turn last taken, a new client id with every request kept that turn
    from advancing: a client served once waited for as long as new ids came, and every id
    stayed remembered.) Within one client, X-Priority then arrival decide.
    """

    def __init__(self, discipline: Discipline) -> None:
        self.fair = discipline == "fair"
        self._heap: list[tuple[int, int, Ticket]] = []  # fifo: (-priority, seq, ticket)
        self._clients: dict[str, _Client] = {}  # fair: clients waiting, or owing turns
        self._turns: list[tuple[float, int, str]] = []  # fair: (turn, seq, client) if waiting
        self._now = 0.0  # fair: the turn last taken
        self._len = 0
        self.preferred = ""  # fair: the client whose turn it is by an order kept elsewhere

    def __len__(self) -> int:
        return self._len

    def peek(self) -> Ticket:
        """The ticket `pop` would return."""
        if not self.fair:
            return self._heap[0][2]
        return self._clients[self._next_client()].heap[0][2]

    def tickets(self) -> Iterator[Ticket]:
        """Every request waiting, in no order."""
        if not self.fair:
            return (ticket for _, _, ticket in self._heap)
        return (ticket for c in self._clients.values() for _, _, ticket in c.heap)

    def firsts(self, count: int) -> list[Ticket]:
        """FIFO: the first `count` in the order `pop` would return them."""
        return [ticket for _, _, ticket in heapq.nsmallest(count, self._heap)]

    def next_clients(self, count: int) -> list[Ticket]:
        """Fair: the next request of each of the first `count` clients in turn."""
        firsts = heapq.nsmallest(count, self._turns)
        return [self._clients[name].heap[0][2] for _, _, name in firsts]

    def _next_client(self) -> str:
        preferred = self._clients.get(self.preferred)
        if preferred is not None and preferred.heap:
            return self.preferred
        return self._turns[0][2]

    def push(self, ticket: Ticket) -> None:
        entry = (-ticket.priority, ticket.seq, ticket)
        self._len += 1
        if not self.fair:
            heapq.heappush(self._heap, entry)
            return
        client = self._clients.get(ticket.client)
        if client is None:
            client = self._clients[ticket.client] = _Client(self._now)
        if not client.heap:  # it waits again: its turn, or one stride on if that has passed
            client.turn = max(client.turn, self._now + 1.0 / ticket.weight)
            heapq.heappush(self._turns, (client.turn, ticket.seq, ticket.client))
        heapq.heappush(client.heap, entry)

    def pop(self) -> Ticket:
        self._len -= 1
        if not self.fair:
            return heapq.heappop(self._heap)[2]
        name = self._next_client()
        if name == self._turns[0][2]:
            turn = heapq.heappop(self._turns)[0]
        else:  # its turn by the shared order: taken out of the local one
            turn = max(self._clients[name].turn, self._now)
            self._turns = [t for t in self._turns if t[2] != name]
            heapq.heapify(self._turns)
        self.preferred = ""
        client = self._clients[name]
        ticket = heapq.heappop(client.heap)[2]
        self._now = turn
        client.turn = turn + 1.0 / ticket.weight
        if client.heap:
            heapq.heappush(self._turns, (client.turn, client.heap[0][1], name))
        else:
            self._forget_idle()
        return ticket

    def remove(self, ticket: Ticket) -> None:
        self._len -= 1
        entry = (-ticket.priority, ticket.seq, ticket)
        if not self.fair:
            self._heap.remove(entry)
            heapq.heapify(self._heap)
            return
        client = self._clients[ticket.client]
        heap = client.heap
        heap.remove(entry)
        heapq.heapify(heap)
        if not heap:  # no turn while it has nothing waiting
            # Nor one owed for what it gave up: it is placed anew when it waits again.
            client.turn = min(client.turn, self._now)
            self._turns = [t for t in self._turns if t[2] != ticket.client]
            heapq.heapify(self._turns)
            self._forget_idle()

    @property
    def clients(self) -> int:
        """Clients remembered: those waiting, and those whose next turn is still to come."""
        return len(self._clients)

    def _forget_idle(self) -> None:
        """Clients with nothing waiting whose next turn has come: they would start at the
        current turn anyway. Swept when they outnumber the waiting ones (two to one, past 64),
        so that clients that come and go cannot grow the queue, at a cost spread thin."""
        if len(self._clients) <= 2 * len(self._turns) + 64:
            return
        now = self._now
        self._clients = {n: c for n, c in self._clients.items() if c.heap or c.turn > now}


def _current(entry: tuple[float, int, Ticket]) -> bool:
    """Whether a timeout entry still stands for its ticket's wait."""
    key, _, ticket = entry
    return ticket.queued and key == ticket.queue_key


class Scheduler:
    def __init__(self, settings: SchedulerSettings, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self.backends: dict[str, Backend] = {}
        self._queues: dict[str, _ModelQueue] = {}
        # Waiting tickets by `queue_key`, for timeouts; an entry whose key is no longer its
        # ticket's (it was bound, or requeued with a later key) is stale and skipped.
        self._waiting: list[tuple[float, int, Ticket]] = []
        self._seq = itertools.count()
        self._dispatched: list[Ticket] = []
        self._returned: list[tuple[str, str]] = []  # shared slots' leases given back
        self._timed_out: list[Ticket] = []
        self._service_seconds: dict[str, float] = {}  # EWMA per model, for Retry-After
        self._router = Router()
        self.outcomes: Counter[Outcome] = Counter()
        self.total = 0

    # -- backends -------------------------------------------------------------------------------

    def add_backend(self, backend: Backend) -> None:
        if self.settings.shared_slots and backend.leased is None:
            backend.leased = Counter()
        self.backends[backend.name] = backend
        self._dispatch_all()

    def remove_backend(self, name: str) -> None:
        """No new work; requests already there finish and release as usual."""
        self.backends.pop(name, None)
        self._router.forget(name)

    def set_draining(self, name: str, draining: bool) -> None:
        self.backends[name].draining = draining
        self._dispatch_all()

    def set_online(self, name: str, online: bool) -> None:
        """Whether the engine process behind the backend serves: `parallama up` takes a backend
        out while its process is down or restarting, so that nothing is sent to whatever else
        may answer on that port meanwhile."""
        backend = self.backends.get(name)
        if backend is not None:
            backend.online = online
            self._dispatch_all()

    def online(self, names: Iterable[str]) -> list[str]:
        """Of `names`, the backends whose engine serves: not those `parallama up` knows are
        down, whatever answers on their port meanwhile."""
        return [n for n in names if n in self.backends and self.backends[n].online]

    def set_standby(self, name: str, standby: bool) -> None:
        """Whether requests wait for the backend while it is offline: autoscaling starts its
        engine when they do (`parallama up`)."""
        backend = self.backends.get(name)
        if backend is not None:
            backend.standby = standby

    def observe_busy(self, name: str, busy: int | None) -> None:
        """The engine says `busy` of its slots run a request: what it runs beyond this gateway's
        own is left room for until it is looked at again. None: it could not tell (nothing is
        left room for on old news)."""
        backend = self.backends.get(name)
        if backend is None:
            return
        outside = 0 if busy is None else max(0, busy - backend.active)
        if outside != backend.outside:
            backend.outside = outside
            self._dispatch_all()

    def set_inventory(self, name: str, models: Iterable[str] | None) -> None:
        self.backends[name].inventory = None if models is None else frozenset(models)
        self._dispatch_all()

    def set_loaded(self, name: str, models: Iterable[str]) -> None:
        backend = self.backends[name]
        before, backend.loaded = backend.loaded, set(models)
        if backend.room is not None and backend.loaded != before:
            self._dispatch_all()  # room freed or taken: model affinity may place a waiting model

    def kv_bytes(self, model: str) -> int | None:
        """`model`'s KV cache per token, if a backend told it (prefix affinity)."""
        return self._router.kv_bytes(model)

    def learn_kv_bytes(self, model: str, per_token: int) -> None:
        self._router.learn_kv_bytes(model, per_token)

    def report(self, name: str, ok: bool) -> bool:
        """A request or probe on the backend succeeded or failed: its breaker decides.
        True if that may have changed where requests go."""
        backend = self.backends.get(name)
        if backend is None:
            return False
        breaker = backend.breaker
        if ok and breaker.state is BreakerState.CLOSED and breaker.failures == 0:
            return False  # the common case, on every answer: nothing to do
        if ok:
            breaker.success()
        else:
            breaker.failure(self._clock())
        self._dispatch_all()
        return True

    def trip(self, name: str) -> None:
        """Another gateway found the backend failing: its breaker opens here too."""
        backend = self.backends.get(name)
        if backend is not None:
            backend.breaker.open(self._clock())

    def throttle(self, name: str) -> None:
        """The backend answered "server busy": halve its slots per model for a while."""
        backend = self.backends.get(name)
        if backend is not None:
            backend.cap = max(1, backend.capacity // 2)
            backend.cap_until = self._clock() + self.settings.busy_seconds

    # -- requests -------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(sum(b.in_flight.values()) for b in self.backends.values())

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queue_depth(self, model: str) -> int:
        queue = self._queues.get(model)
        return len(queue) if queue else 0

    def position(self, ticket: Ticket) -> int:
        """A waiting request's place in its model's queue, from 1: how many would be bound
        before it, plus one (by priority and arrival; in the fair discipline, other clients'
        turns can move it)."""
        queue = self._queues.get(ticket.model)
        if queue is None or not ticket.queued:
            return 0
        mine = (-ticket.priority, ticket.seq)
        return 1 + sum((-t.priority, t.seq) < mine for t in queue.tickets())

    def oldest_waits(self, now: float) -> dict[str, float]:
        """Per model with requests waiting, how long the longest-waiting one has waited."""
        return {
            model: max(ticket.queue_seconds(now) for ticket in queue.tickets())
            for model, queue in self._queues.items()
            if queue
        }

    def queue_depths(self) -> dict[str, int]:
        """Waiting requests of each model that has any."""
        return {model: len(queue) for model, queue in self._queues.items() if queue}

    def lists(self, model: str) -> bool:
        """Whether some backend has the model installed, or is configured to serve it: a name
        the fleet knows, not one a client made up."""
        return any(
            model in (b.inventory or ()) or model in (b.models or ())
            for b in self.backends.values()
        )

    def refuse(self) -> None:
        """Count a request turned away before it could be queued (bad input) as rejected."""
        self.total += 1
        self.outcomes[Outcome.REJECTED] += 1

    def submit(
        self,
        model: str,
        *,
        client: str = "",
        priority: int = 0,
        session: str = "",
        prefix: Blocks = (),
        weight: float = 1.0,
        deadline: float | None = None,
        size: int = 0,
    ) -> Ticket:
        """Admit a request, or raise `QueueFullError`, `NoBackendError`, `UnavailableError`
        or `DeadlineError` (counted as rejected).

        The queue bounds and the deadline apply only to requests that would have to wait; the
        queue is bounded in requests and in the bytes (`size`) their bodies hold."""
        self.total += 1
        ticket = Ticket(
            model, client, priority, self._clock(), next(self._seq), session, prefix, weight
        )
        ticket.size = size
        if self.queue_depth(model) == 0:
            backend = self._choose(ticket, waiting=1)
            if backend is not None:  # a free slot and nobody ahead: bind at once
                self._bind(ticket, backend)
                return ticket
        offering = [b for b in self.backends.values() if b.offers(model)]
        if not offering:
            self._end(ticket, Outcome.REJECTED)
            raise NoBackendError(model)
        if not any(b.awaits(model) for b in offering):
            self._end(ticket, Outcome.REJECTED)
            reopen = [b.breaker.next_change() or 0.0 for b in offering if not b.draining]
            wait = min(reopen, default=0.0) - self._clock()
            raise UnavailableError(model, max(1.0, math.ceil(wait)))
        if self.queued >= self.settings.max_queue:
            self._end(ticket, Outcome.REJECTED)
            raise QueueFullError("gateway", self.retry_after(model))
        if self.queue_depth(model) >= self.settings.max_queue_per_model:
            self._end(ticket, Outcome.REJECTED)
            raise QueueFullError(f"model '{model}'", self.retry_after(model))
        if self.queued_bytes() + size > self.settings.max_queue_bytes:
            self._end(ticket, Outcome.REJECTED)
            limit = self.settings.max_queue_bytes
            raise QueueFullError(f"gateway ({limit} bytes of bodies)", self.retry_after(model))
        if deadline is not None and (expected := self.expected_wait(model)) > deadline:
            self._end(ticket, Outcome.REJECTED)
            raise DeadlineError(expected, deadline, self.retry_after(model))
        queue = self._queues.setdefault(model, _ModelQueue(self.settings.discipline))
        queue.push(ticket)
        heapq.heappush(self._waiting, (ticket.queue_key, ticket.seq, ticket))
        self._dispatch(model)
        return ticket

    def queued_bytes(self) -> int:
        """What the waiting requests' bodies hold (counted only when one would wait)."""
        return sum(t.size for queue in self._queues.values() for t in queue.tickets())

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: leave the queue, or free the backend slot it held."""
        if ticket.outcome is not None:
            return
        if ticket.backend is None:
            self._leave_queue(ticket)
            self._end(ticket, Outcome.CANCELLED)
        else:
            room_freed = self._free(ticket)
            self._end(ticket, Outcome.CANCELLED)
            self._dispatch_freed(ticket.model, room_freed)

    def release(
        self, ticket: Ticket, outcome: Outcome = Outcome.COMPLETED, tokens: int = 0
    ) -> None:
        """The backend finished with the request (answered, or failed): free its slot.
        `tokens`: those it generated, for slots learned from what they give."""
        backend = ticket.backend
        if ticket.outcome is not None or backend is None:
            return
        if outcome is Outcome.COMPLETED and ticket.dispatched_at is not None:
            now = self._clock()
            took = now - ticket.dispatched_at
            previous = self._service_seconds.get(ticket.model, took)
            self._service_seconds[ticket.model] = 0.8 * previous + 0.2 * took
            backend.loaded.add(ticket.model)  # it answered: the model is loaded there
            if backend.tuner is not None and tokens and took > 0:
                waiting = self.queue_depth(ticket.model) > 0
                if backend.tuner.observe(ticket.concurrency, tokens / took, now, waiting):
                    backend.slots = backend.tuner.limit
        room_freed = self._free(ticket)
        self._end(ticket, outcome)
        self._dispatch_freed(ticket.model, room_freed)

    def has_alternative(self, ticket: Ticket) -> bool:
        """Could another backend than the ticket's (and those it failed on) take it?"""
        tried = ticket.avoid | ({ticket.backend.name} if ticket.backend else set())
        return any(b.serves(ticket.model) and b.name not in tried for b in self.backends.values())

    def requeue(self, ticket: Ticket) -> bool:
        """Failover before the first byte: give back the slot and wait again, keeping its place,
        for any backend but those it failed on. False (and failed) if no other could take it."""
        if ticket.outcome is not None or ticket.backend is None:
            return False
        model = ticket.model
        alternative = self.has_alternative(ticket)
        room_freed = self._free(ticket)
        ticket.avoid |= {ticket.backend.name}
        ticket.backend = None
        ticket.dispatched_at = None
        ticket.queued_since = self._clock()
        if not alternative:
            self._end(ticket, Outcome.FAILED)
            self._dispatch_freed(model, room_freed)
            return False
        self._queues.setdefault(model, _ModelQueue(self.settings.discipline)).push(ticket)
        # Its time on the failed backend is no queue time: a later key (its first entry, if still
        # in the heap, is now stale), and a fresh tie-breaker.
        heapq.heappush(self._waiting, (ticket.queue_key, next(self._seq), ticket))
        self._dispatch_freed(model, room_freed)
        return True

    def tick(self) -> None:
        """Time out requests that waited longer than `queue_timeout`; end cooldowns."""
        now = self._clock()
        capacity_returned = False  # only then can a waiting request be bound now
        for backend in self.backends.values():
            was = backend.breaker.state
            backend.breaker.poll(now)
            capacity_returned |= backend.breaker.state is not was
            if backend.cap is not None and now >= backend.cap_until:
                backend.cap = None
                capacity_returned = True
        if capacity_returned:
            self._dispatch_all()
        # The deadline as next_wakeup computes it: `now - timeout` may round below it, and the
        # driver would be woken again at once, for ever on a virtual clock.
        timeout = self.settings.queue_timeout
        while self._waiting and self._waiting[0][0] + timeout <= now:
            entry = heapq.heappop(self._waiting)
            ticket = entry[2]
            if _current(entry):
                self._leave_queue(ticket)
                self._end(ticket, Outcome.TIMED_OUT)
                self._timed_out.append(ticket)

    def next_wakeup(self) -> float | None:
        waiting = self._waiting
        while waiting and not _current(waiting[0]):
            heapq.heappop(waiting)
        soonest = waiting[0][0] + self.settings.queue_timeout if waiting else math.inf
        for b in self.backends.values():  # asked after every change: no lists built
            if (change := b.breaker.next_change()) is not None:
                soonest = min(soonest, change)
            if b.cap is not None:
                soonest = min(soonest, b.cap_until)
        return None if soonest == math.inf else soonest

    def take_dispatched(self) -> list[Ticket]:
        dispatched, self._dispatched = self._dispatched, []
        return dispatched

    def take_timed_out(self) -> list[Ticket]:
        timed_out, self._timed_out = self._timed_out, []
        return timed_out

    def expected_wait(self, model: str) -> float:
        """Seconds a request of `model` queued now can expect to wait: until as many answers
        as there are requests ahead of it, and one more, have ended on the slots serving it, at
        the model's observed service time (0 before any answer was timed: no evidence)."""
        capacity = sum(b.capacity for b in self.backends.values() if b.serves(model))
        per_request = self._service_seconds.get(model, 0.0)
        if capacity == 0:  # waiting for an engine to start (autoscaling): how long, unknown
            standby = any(b.awaits(model) for b in self.backends.values())
            return 0.0 if standby else self.settings.queue_timeout
        return (self.queue_depth(model) + 1) * per_request / capacity

    def retry_after(self, model: str) -> float:
        """Seconds until the model's queue has likely drained: what `Retry-After` says."""
        capacity = sum(b.slots for b in self.backends.values() if b.serves(model))
        per_request = self._service_seconds.get(model, 1.0)
        if capacity == 0:
            return self.settings.queue_timeout
        return max(1.0, math.ceil(self.queue_depth(model) * per_request / capacity))

    # -- the machine ----------------------------------------------------------------------------

    def _end(self, ticket: Ticket, outcome: Outcome) -> None:
        ticket.stop_waiting(self._clock())
        ticket.outcome = outcome
        self.outcomes[outcome] += 1

    def _leave_queue(self, ticket: Ticket) -> None:
        queue = self._queues[ticket.model]
        queue.remove(ticket)
        if not queue:  # model names come from clients: keep no empty queue around
            del self._queues[ticket.model]

    def _free(self, ticket: Ticket) -> bool:
        """Give back the ticket's slot; True if that left its model idle on a backend whose
        room is known (model affinity may put another model in its place)."""
        backend = ticket.backend
        assert backend is not None
        backend.last_release = self._clock()
        if ticket.prefix_slot >= 0:
            self._router.released(ticket, backend)
            ticket.prefix_slot = -1
        backend.in_flight[ticket.model] -= 1
        idle = backend.in_flight[ticket.model] <= 0
        if idle:
            del backend.in_flight[ticket.model]
        if backend.leased is not None:  # its lease goes back to all gateways
            self._return_lease(backend, ticket.model)
        return idle and backend.room is not None

    def _dispatch_freed(self, model: str, room_freed: bool) -> None:
        """After a slot of `model` was given back: its queue; every queue if that left the
        model idle where room counts (a request of another model may wait to take its place)."""
        if room_freed:
            self._dispatch_all()
        else:
            self._dispatch(model)

    def placement_changed(self) -> None:
        """Models kept or being loaded changed (the warmer): waiting requests may go now."""
        self._dispatch_all()

    # -- slots shared with other gateways -------------------------------------------------------

    def wanted(self) -> dict[str, int]:
        """Leases to acquire, per model: one for each request waiting."""
        return {model: len(queue) for model, queue in self._queues.items() if queue}

    def next_tickets(self, model: str, count: int) -> list[Ticket]:
        """FIFO: the first `count` requests of `model` in the order leases would go to them."""
        queue = self._queues.get(model)
        return queue.firsts(count) if queue else []

    def next_clients(self, model: str, count: int) -> list[Ticket]:
        """Fair: the next request of each of the first `count` clients in turn, for an order
        kept across gateways to choose from (`grant(..., client=)`)."""
        queue = self._queues.get(model)
        return queue.next_clients(count) if queue else []

    def candidates(self, model: str) -> list[Backend]:
        """The backends a lease for `model` may be asked of, least loaded first: those that
        serve it and that the next request has not failed on (full or not: Redis counts)."""
        queue = self._queues.get(model)
        avoid = queue.peek().avoid if queue else frozenset()
        serving = [b for b in self.backends.values() if b.serves(model) and b.name not in avoid]
        return sorted(serving, key=lambda b: b.load())

    def grant(self, name: str, model: str, client: str = "") -> None:
        """A lease on one of `name`'s slots for `model` was acquired: bind a waiting request
        to it (`client`'s next, fair, if it still waits). One that no request takes (it left
        meanwhile) is given back at once."""
        backend = self.backends.get(name)
        if backend is None or backend.leased is None:
            self._returned.append((name, model))
            return
        backend.leased[model] += 1
        queue = self._queues.get(model)
        if queue is not None:
            queue.preferred = client
        self._dispatch(model)
        if backend.leased[model] > backend.in_flight[model]:
            self._return_lease(backend, model)

    def take_returned(self) -> list[tuple[str, str]]:
        """The leases given back since the last call: (backend, model) each."""
        returned, self._returned = self._returned, []
        return returned

    def _return_lease(self, backend: Backend, model: str) -> None:
        assert backend.leased is not None
        backend.leased[model] -= 1
        if backend.leased[model] <= 0:
            del backend.leased[model]
        self._returned.append((backend.name, model))

    def policy(self, model: str) -> Policy:
        return self.settings.routing_by_model.get(model, self.settings.routing)

    def _choose(self, ticket: Ticket, waiting: int) -> Backend | None:
        model = ticket.model
        serving = [
            b for b in self.backends.values() if b.serves(model) and b.name not in ticket.avoid
        ]
        settings = self.settings
        return self._router.choose(
            self.policy(model), ticket, serving, waiting,
            prefix_balance=settings.prefix_balance, prefix_wait=settings.prefix_wait,
        )  # fmt: skip

    def _dispatch(self, model: str) -> None:
        queue = self._queues.get(model)
        if queue is None:
            return
        cached_first = self.policy(model) == "prefix-affinity"
        # Prefix affinity lets the head wait beside a free slot only with `prefix_wait`: then
        # the requests behind it are looked at, else a head that waits means no slot is free.
        look_behind = cached_first and self.settings.prefix_wait > 0
        while queue:
            head = queue.peek()
            backend = self._choose(head, waiting=len(queue))
            if backend is None:
                if not look_behind or (placed := self._placed_behind(queue, head)) is None:
                    return
                self._bind(*placed)
                continue
            if cached_first:
                self._bind(self._take_cached(queue, head, backend), backend)
            else:
                self._bind(queue.pop(), backend)
        del self._queues[model]

    def _placed_behind(self, queue: _ModelQueue, head: Ticket) -> tuple[Ticket, Backend] | None:
        """Prefix affinity: the head waits for a slot that will hold its prefix; the first of
        the next requests (of its priority) that a free slot suits goes meanwhile, taken out of
        the queue, so that a request of its own prompt does not wait behind it."""
        window = queue.next_clients(LOOKAHEAD) if queue.fair else queue.firsts(LOOKAHEAD)
        for ticket in window:
            if ticket is head or ticket.priority != head.priority:
                continue
            backend = self._choose(ticket, waiting=len(queue))
            if backend is not None:
                if queue.fair:
                    queue.preferred = ticket.client
                    return queue.pop(), backend
                queue.remove(ticket)
                return ticket, backend
        return None

    def _take_cached(self, queue: _ModelQueue, head: Ticket, backend: Backend) -> Ticket:
        """Prefix affinity: of the next requests in order (FIFO, or each client's next in
        fair turns), of the head's priority, the one that may find most of its prompt cached
        on `backend`; those passed over count it, and one passed over `LOOKAHEAD` times goes
        first. Under load, when a slot frees, it so goes to a request that shares its prefix."""
        if head.skipped >= LOOKAHEAD or queue.preferred:  # a turn kept across gateways: its own
            return queue.pop()
        window = queue.next_clients(LOOKAHEAD) if queue.fair else queue.firsts(LOOKAHEAD)
        window = [
            head,
            *(
                t
                for t in window
                if t.priority == head.priority and t is not head and backend.name not in t.avoid
            ),
        ]
        chosen = self._router.best_cached(backend, window)
        if chosen is head:
            return queue.pop()
        for ticket in window[: window.index(chosen)]:
            ticket.skipped += 1
        if queue.fair:
            queue.preferred = chosen.client
            return queue.pop()
        queue.remove(chosen)
        return chosen

    def _bind(self, ticket: Ticket, backend: Backend) -> None:
        if self.policy(ticket.model) == "prefix-affinity":  # released whatever the policy then
            self._router.bound(ticket, backend)
        ticket.backend = backend
        ticket.dispatched_at = now = self._clock()
        ticket.stop_waiting(now)
        backend.in_flight[ticket.model] += 1
        ticket.concurrency = backend.in_flight[ticket.model]
        self._dispatched.append(ticket)

    def _dispatch_all(self) -> None:
        for model in list(self._queues):
            self._dispatch(model)

    def accounting(self) -> dict[str, int]:
        """The counters, which always add up to `total`."""
        counts = {o.value: self.outcomes[o] for o in Outcome}
        return {"total": self.total, **counts, "in_flight": self.in_flight, "queued": self.queued}
