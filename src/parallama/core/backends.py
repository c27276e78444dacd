"""What the scheduler knows of one backend: its slots and weight, its health (a circuit
breaker), its load, the models it has and has loaded, and whether it takes work. Probes and
answers update it; the router reads it."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from parallama.core.adaptive import SlotTuner
from parallama.core.breaker import Breaker, BreakerState
from parallama.core.kv_slots import CacheRule


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
