"""Where warm models are loaded: enough copies, spread over the backends that serve them."""

from __future__ import annotations

from parallama.core.placement import Warm, loads_wanted
from parallama.core.scheduler import Backend


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
