"""Where warm models are loaded: enough copies, spread over the backends that serve them."""

from __future__ import annotations

from collections import Counter

from parallama.core.backends import Backend
from parallama.core.placement import Warm, kept_copies, loads_wanted


def fleet(*backends: Backend) -> dict[str, Backend]:
    return {b.name: b for b in backends}


def test_copies_go_to_the_backends_with_fewest_models_loaded() -> None:
    busy = Backend("busy", loaded={"x", "y"})
    idle = Backend("idle")
    other = Backend("other", loaded={"z"})
    wanted = loads_wanted([Warm("m", 2)], fleet(busy, idle, other), set())
    assert wanted == [("idle", "m"), ("other", "m")]


def test_no_load_when_the_replicas_are_there_or_loading_and_only_where_it_is_served() -> None:
    a, b = Backend("a", loaded={"m"}), Backend("b", models=frozenset({"other"}))
    c = Backend("c")
    assert loads_wanted([Warm("m", 1)], fleet(a, b, c), set()) == []
    assert loads_wanted([Warm("m", None)], fleet(a, b, c), {("c", "m")}) == []
    assert loads_wanted([Warm("m", None)], fleet(a, b, c), set()) == [("c", "m")]  # not b


def test_two_warm_models_spread_rather_than_pile_on_one_backend() -> None:
    wanted = loads_wanted([Warm("m", 1), Warm("n", 1)], fleet(Backend("a"), Backend("b")), set())
    assert sorted(backend for backend, _ in wanted) == ["a", "b"]


def keep(warm: list[Warm], backends: dict[str, Backend]) -> dict[str, Backend]:
    """As the warmer does before each round: each backend told the warm copies it keeps."""
    for name, kept in kept_copies(warm, backends).items():
        backends[name].kept = frozenset(kept)
    return backends


def test_where_the_room_is_known_a_warm_load_evicts_no_busy_model_and_no_warm_one() -> None:
    warm = [Warm("m", None), Warm("n", None)]
    busy = Backend("busy", room=1, loaded={"x"}, in_flight=Counter({"x": 1}))
    held = Backend("held", room=1, loaded={"n"})  # n is warm too: it stays
    # m and n are short on both, but neither has room for them: nothing is loaded
    assert loads_wanted(warm, keep(warm, fleet(busy, held)), set()) == []
    idle = Backend("idle", room=1, loaded={"x"})  # x is idle and not warm: it may make way
    roomy = Backend("roomy", room=2, loaded={"n"})
    wanted = loads_wanted(warm, keep(warm, fleet(busy, held, idle, roomy)), set())
    assert sorted(wanted) == [("idle", "m"), ("roomy", "m")]


def test_only_the_copies_a_warm_model_needs_are_kept_from_eviction() -> None:
    backends = fleet(
        Backend("a", loaded={"m"}), Backend("b", loaded={"m", "n"}), Backend("c", loading={"m"})
    )
    kept = kept_copies([Warm("m", 2), Warm("n", None)], backends)
    assert kept == {"a": {"m"}, "b": {"m", "n"}, "c": set()}  # c's copy of m is one too many
    backends["a"].draining = True  # a copy on a backend that serves nothing counts for none
    kept = kept_copies([Warm("m", 2), Warm("n", None)], backends)
    assert kept == {"a": set(), "b": {"m", "n"}, "c": {"m"}}
