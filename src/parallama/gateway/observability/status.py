"""What `/parallama/status` and the live page say of a backend: one shape for both."""

from __future__ import annotations

from typing import Any

from parallama.core.backends import Backend


def backend_state(b: Backend) -> dict[str, Any]:
    """A backend as `/parallama/status` and the dashboard show it."""
    return {
        "url": b.name,
        "healthy": b.healthy,
        "breaker": b.breaker.state.value,
        "draining": b.draining,
        "online": b.online,
        "standby": b.standby,
        "slots": b.slots,
        "slots_learned": None if b.tuner is None else {"min": b.tuner.low, "max": b.tuner.high},
        "capacity": b.capacity,
        "weight": b.weight,
        "models": sorted(b.models) if b.models is not None else None,
        "installed": sorted(b.inventory) if b.inventory is not None else None,
        "loaded": sorted(b.loaded),
        "active": b.active,
        "outside": b.outside,
        "in_flight": dict(b.in_flight),
    }
