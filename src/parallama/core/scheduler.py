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

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from parallama.core.backends import Backend
from parallama.core.breaker import BreakerState
from parallama.core.prefixes import Blocks
from parallama.core.queues import Discipline, ModelQueue
from parallama.core.router import Policy, Router
from parallama.core.tickets import (
    DeadlineError,
    NoBackendError,
    Outcome,
    QueueFullError,
    Ticket,
    UnavailableError,
)

Clock = Callable[[], float]
LOOKAHEAD = 8  # prefix affinity: waiting requests looked at for a freed slot


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


def _current(entry: tuple[float, int, Ticket]) -> bool:
    """Whether a timeout entry still stands for its ticket's wait."""
    key, _, ticket = entry
    return ticket.queued and key == ticket.queue_key


class Scheduler:
    def __init__(self, settings: SchedulerSettings, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self.backends: dict[str, Backend] = {}
        self._queues: dict[str, ModelQueue] = {}
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
        queue = self._queues.setdefault(model, ModelQueue(self.settings.discipline))
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
        self._queues.setdefault(model, ModelQueue(self.settings.discipline)).push(ticket)
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

    def _placed_behind(self, queue: ModelQueue, head: Ticket) -> tuple[Ticket, Backend] | None:
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

    def _take_cached(self, queue: ModelQueue, head: Ticket, backend: Backend) -> Ticket:
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
