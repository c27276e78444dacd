"""Where warm models should be loaded (sans-I/O): `warm = true` under `[models."name"]` keeps a
model loaded on `replicas` of the backends that serve it (all of them when unset), so that the
first user after a start, a restart or an eviction never waits for a load.

Each round, the caller tells what the probes found loaded; this says which loads to start: for
a model short of its replicas, the serving backends that have it not loaded, those with fewest
models loaded (then least busy) first, so that the copies spread instead of piling on one; where
a backend's room (`max_loaded_models`) is known, only if it has room left or an idle model that
is not warm, so that one warm model never evicts another, nor a busy one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from parallama.core.backends import Backend


@dataclass(frozen=True, slots=True)
class Warm:
    """A model to keep loaded: under the backends' name for it, on so many of them."""

    model: str
    replicas: int | None  # None: every backend that serves it


def loads_wanted(
    warm: Iterable[Warm], backends: Mapping[str, Backend], loading: set[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(backend, model) loads to start now; `loading`: those started and not yet seen loaded."""
    wanted: list[tuple[str, str]] = []
    planned: dict[str, int] = {name: len(b.held()) for name, b in backends.items()}

    def fits(b: Backend) -> bool:
        """Room for one more where its room is known: free, or an idle model not kept warm."""
        idle = b.idle() - b.kept
        return b.room is None or planned[b.name] - len(idle) < b.room

    for model in warm:
        serving = [b for b in backends.values() if b.serves(model.model)]
        have = [b for b in serving if model.model in b.loaded or (b.name, model.model) in loading]
        short = (len(serving) if model.replicas is None else model.replicas) - len(have)
        spare = sorted(
            (b for b in serving if b not in have and fits(b)),
            key=lambda b: (planned[b.name], b.load()),
        )
        for backend in spare[: max(0, short)]:
            wanted.append((backend.name, model.model))
            planned[backend.name] += 1
    return wanted


def kept_copies(warm: Iterable[Warm], backends: Mapping[str, Backend]) -> dict[str, set[str]]:
    """Per backend, the warm models whose copy there counts towards their replicas (loaded or
    loading; the first ones in configured order): those no other model may evict. A copy
    beyond the replicas (model affinity loaded it for a burst) is an idle model like any."""
    kept: dict[str, set[str]] = {name: set() for name in backends}
    for model in warm:
        holders = [
            n
            for n, b in backends.items()
            if b.serves(model.model) and model.model in b.loaded | b.loading
        ]
        for name in holders if model.replicas is None else holders[: model.replicas]:
            kept[name].add(model.model)
    return kept


def placement(
    warm: Iterable[Warm], backends: Mapping[str, Backend], loading: set[tuple[str, str]]
) -> dict[str, dict[str, object]]:
    """Per model, for `/parallama/status`: where it is loaded, where it is loading, and the
    replicas wanted (a warm model's; others are loaded where users sent them)."""
    shown: dict[str, dict[str, object]] = {}
    for model in warm:
        shown[model.model] = {
            "warm": True,
            "replicas": model.replicas,
            "loaded_on": sorted(n for n, b in backends.items() if model.model in b.loaded),
            "loading_on": sorted(n for n, m in loading if m == model.model),
        }
    return shown
