"""Routing policies (sans-I/O): which backend takes a request, among those able to serve it.

The scheduler calls `Router.choose` only at the moment a request could be bound (late binding),
with the backends that serve its model and are healthy; a policy may also answer None: "wait
for a better slot", which is how model affinity keeps a model on the backends that have it
loaded until they are saturated.

Prefix affinity sends a request to the free backend that may still hold the longest part of its
prompt in its KV cache (`core.prefixes`), so that the engine skips that part's prefill, unless
that backend is busier than the least loaded free one by more than a bound (a share of its
capacity): a cache is worth a little imbalance, not a queue. With nothing cached, it is
least-loaded. And it follows a prefix being computed: when a request running on a backend
shares much more of the prompt (a quarter of it, `prefix_wait`) than any free slot holds (a
system prompt shared by a burst of agent sessions), the request goes to that backend's free
slot, which needs a copy of its own anyway (no engine shares a prompt between slots while they
run), within `prefix_balance`; with none free, it waits for one of its slots rather than have
the same prefix evaluated on a backend that does not hold it, as long as no more requests wait
than those backends have slots: past that, the prefix spreads to another backend.
"""

from __future__ import annotations

import hashlib
import typing
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from parallama.core.prefixes import PrefixMemory

if TYPE_CHECKING:
    from parallama.core.backends import Backend
    from parallama.core.tickets import Ticket

Policy = Literal[
    "least-loaded",
    "round-robin",
    "weighted",
    "model-affinity",
    "session-affinity",
    "prefix-affinity",
]
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)


def _least_loaded(model: str, free: Sequence[Backend]) -> Backend:
    """Least busy for its capacity, preferring one that has the model loaded (no load time)."""
    if len(free) == 1:
        return free[0]
    return min(free, key=lambda b: (model not in b.loaded, b.load(), b.name))


def _affinity(session: str, backend: str) -> bytes:
    """Rendezvous hashing: each session ranks every backend; adding or removing a backend moves
    only the sessions that ranked it first."""
    return hashlib.blake2b(f"{session}\n{backend}".encode(), digest_size=8).digest()


MAX_KV_MODELS = 4096  # models whose KV size is kept (backends name them, not clients)
WAIT_BLOCKS = 4  # prefix affinity: waited for only if this much more (some 256 tokens)


class Router:
    def __init__(self) -> None:
        self._turn = 0  # round-robin
        self._credit: dict[str, float] = {}  # smooth weighted round-robin, as nginx does it
        self._prefixes: dict[str, PrefixMemory] = {}  # per backend: what its slots may hold
        self._kv_bytes: dict[str, int] = {}  # per model: its KV cache per token, where known

    def choose(
        self,
        policy: Policy,
        ticket: Ticket,
        serving: Sequence[Backend],
        waiting: int,
        *,
        prefix_balance: float = 0.5,
        prefix_wait: float = 0.0,
    ) -> Backend | None:
        """`serving`: the healthy backends allowed to take the ticket's model, in configured
        order, busy or not; `waiting`: the model's queued requests, this one included;
        `prefix_balance`, `prefix_wait`: prefix affinity's bounds (see above)."""
        model = ticket.model
        free = [b for b in serving if b.has_free_slot(model)]
        if policy == "model-affinity":
            return self._warm_first(model, serving, free, waiting)
        if not free:
            return None
        if policy == "prefix-affinity":
            return self._cached_first(
                ticket, serving, free, waiting, balance=prefix_balance, wait=prefix_wait
            )
        if policy == "round-robin":
            return self._round_robin(serving, free)
        if policy == "weighted":
            return self._weighted(free)
        if policy == "session-affinity":
            return max(free, key=lambda b: _affinity(ticket.session, b.name))
        return _least_loaded(model, free)

    def _cached_first(
        self,
        ticket: Ticket,
        serving: Sequence[Backend],
        free: Sequence[Backend],
        waiting: int,
        *,
        balance: float,
        wait: float,
    ) -> Backend | None:
        model, prefix = ticket.model, ticket.prefix
        least = _least_loaded(model, free)
        if not prefix:
            return least
        cached = {b.name: self.prefixes(b).match(model, prefix) for b in free}
        best = max(free, key=lambda b: (cached[b.name], -b.load(), b.name))
        chosen = best if cached[best.name] and best.load() - least.load() <= balance else least
        if not wait:
            return chosen
        enough = cached[chosen.name] + max(WAIT_BLOCKS, wait * len(prefix))
        computing = [b for b in serving if self.prefixes(b).match_running(model, prefix) >= enough]
        if not computing:
            return chosen
        roomy = [b for b in computing if b in free and b.load() - least.load() <= balance]
        if roomy:  # where the prefix is hot: its other slots will serve the next ones
            return _least_loaded(model, roomy)
        if waiting <= sum(b.capacity for b in computing):
            return None  # a slot there will hold far more of the prompt: wait for it
        return chosen

    def best_cached(self, backend: Backend, tickets: Sequence[Ticket]) -> Ticket:
        """Of `tickets` (in order), the first of those that may find most of their prompt
        cached on `backend`."""
        memory = self.prefixes(backend)
        return max(tickets, key=lambda t: memory.match(t.model, t.prefix))

    def bound(self, ticket: Ticket, backend: Backend) -> None:
        """Prefix affinity: the ticket was sent to `backend`, where it takes a slot."""
        ticket.prefix_slot = self.prefixes(backend).take(ticket.model, ticket.prefix, backend.slots)

    def released(self, ticket: Ticket, backend: Backend) -> None:
        """Prefix affinity: the ticket's slot is idle again, holding its prompt."""
        self.prefixes(backend).release(ticket.model, ticket.prefix_slot, ticket.prefix)

    def prefixes(self, backend: Backend) -> PrefixMemory:
        """What the backend's slots may hold; a model it has unloaded holds nothing."""
        memory = self._prefixes.get(backend.name)
        if memory is None or (memory.rule, memory.ram) != (backend.cache_rule, backend.cache_ram):
            memory = PrefixMemory(backend.cache_rule, backend.cache_ram, self._kv_bytes)
            self._prefixes[backend.name] = memory
        for model in memory.models():
            if model not in backend.loaded and not backend.in_flight[model]:
                memory.forget(model)
        return memory

    def _round_robin(self, serving: Sequence[Backend], free: Sequence[Backend]) -> Backend:
        """The next backend in turn that has a free slot."""
        count = len(serving)
        for step in range(count):
            backend = serving[(self._turn + step) % count]
            if backend in free:
                self._turn = (self._turn + step + 1) % count
                return backend
        raise AssertionError("a free backend is always among the serving ones")

    def _weighted(self, free: Sequence[Backend]) -> Backend:
        """Each free backend earns its weight; the richest is chosen and pays the total."""
        for backend in free:
            self._credit[backend.name] = self._credit.get(backend.name, 0.0) + backend.weight
        chosen = max(free, key=lambda b: (self._credit[b.name], b.weight))
        self._credit[chosen.name] -= sum(b.weight for b in free)
        return chosen

    @staticmethod
    def _warm_first(
        model: str, serving: Sequence[Backend], free: Sequence[Backend], waiting: int
    ) -> Backend | None:
        """A backend with the model loaded (or loading) if one is free; else wait for one, unless
        more requests wait than the warm backends have slots: then load it on another.

        Loading it there must not cost more than it gains: where a backend's room (how many
        models it keeps at once) is known, the model goes only into free room, or in place of
        an idle model (one that runs nothing) that another backend also holds, so that nothing
        busy is evicted, nor the last copy of a model that will be asked for again; a model
        loaded nowhere yet may take any idle one's place. Else it waits. (Evicting a busy model
        makes the engine wait for it to finish, and then its requests load it elsewhere in
        turn: in a fleet short of room, loads chase each other.)"""
        held = {b.name: b.held() for b in serving}
        warm = [b for b in serving if model in held[b.name]]
        free_warm = [b for b in free if b in warm]
        if free_warm:
            return _least_loaded(model, free_warm)
        if warm and waiting <= sum(b.capacity for b in warm):
            return None
        cold = [b for b in free if b not in warm]
        if not cold:
            return None
        roomy = [b for b in cold if b.room is None or len(held[b.name]) < b.room]
        if roomy:  # the fewest models held: the least likely to evict one
            return min(roomy, key=lambda b: (len(held[b.name]), b.load(), b.name))
        copies = Counter(m for models in held.values() for m in models)

        def spare(b: Backend) -> int:
            """Idle models there that may make way: held elsewhere too and not a warm model's
            needed copy; or, if this model is held nowhere, any (it must be served somewhere);
            no more than its room leaves beside the busy ones (the probes may not have seen an
            eviction yet)."""
            idle = b.idle()
            if warm:
                idle -= b.kept
            may_go = sum(1 for m in idle if copies[m] > 1 or not warm)
            return min(may_go, (b.room or 0) - (len(held[b.name]) - len(idle)))

        best = max(cold, key=lambda b: (spare(b), -b.load()))
        return best if spare(best) > 0 else None

    def forget(self, backend: str) -> None:
        self._credit.pop(backend, None)
        self._prefixes.pop(backend, None)

    def kv_bytes(self, model: str) -> int | None:
        return self._kv_bytes.get(model)

    def learn_kv_bytes(self, model: str, per_token: int) -> None:
        """A backend told `model`'s KV cache per token: each backend's RAM cache of it holds
        that many blocks from now on (slots in use keep theirs)."""
        if self._kv_bytes.get(model) == per_token or len(self._kv_bytes) >= MAX_KV_MODELS:
            return
        self._kv_bytes[model] = per_token
        for memory in self._prefixes.values():
            memory.rebudget(model)
