"""llama.cpp server's prompt cache (slots and host-RAM cache), as the emulator and the gateway
both run it."""

from __future__ import annotations

from parallama.core.kv_slots import EngineSlots
from parallama.sim.catalog import spec_for
from parallama.sim.prompt_cache import common_prefix, ram_tokens

Tokens = tuple[str, ...]
SYSTEM: Tokens = tuple(f"s{i}" for i in range(50))


def engine(slots: int, budget: int = 0) -> EngineSlots[Tokens]:
    return EngineSlots(slots, budget, common_prefix)


def test_a_conversations_next_turn_finds_its_slot() -> None:
    slots = engine(2)
    first = (*SYSTEM, "q1")
    slot, shared = slots.take(first)
    assert shared == 0
    slots.give_back(slot, (*first, "a1", "a1b"))  # the prompt and the answer
    second = (*first, "a1", "a1b", "q2")
    assert slots.take(second) == (slot, len(second) - 1)
    other, shared = slots.take(second)  # its slot is busy: the other, empty one
    assert (other, shared) == (1 - slot, 0)
    assert slots.take(second) == (-1, 0)  # none idle


def test_a_small_overlap_takes_the_least_recently_used_slot() -> None:
    slots = engine(2)
    for tokens in (("a",) * 40, ("b",) * 40):
        slot, _ = slots.take(tokens)
        slots.give_back(slot, tokens)
    # 3 of 40 shared with the second slot: not over a tenth, so the least recently used idle
    # slot, the first, is taken (and overwritten), with nothing of it shared.
    assert slots.take(("b",) * 3 + ("c",) * 37) == (0, 0)
    assert slots.take(("b",) * 5 + ("c",) * 35) == (1, 5)  # over a tenth: that slot


def test_a_slot_overwritten_is_saved_in_ram_and_restored_for_its_next_turn() -> None:
    slots = engine(1, budget=10_000)
    ours = (*SYSTEM, "q1", "a1")
    slot, _ = slots.take(ours[:-1])
    slots.give_back(slot, ours)
    stranger = tuple(f"x{i}" for i in range(60))
    slot, _ = slots.take(stranger)  # least recently used: `ours` goes to RAM first
    slots.give_back(slot, stranger)
    assert slots.saved == [ours]
    assert slots.found((*ours, "q2")) == len(ours)
    assert slots.take((*ours, "q2")) == (0, len(ours))  # restored: the stranger saved instead
    assert slots.saved == [stranger]


def test_the_ram_cache_keeps_to_its_budget_oldest_out_and_drops_what_another_extends() -> None:
    slots = engine(1, budget=60)

    def run(tokens: Tokens, then: Tokens | None = None) -> None:
        slot, _ = slots.take(tokens)  # the slot's sequence goes to RAM first
        slots.give_back(slot, then or tokens)

    sequences = [tuple(f"{n}-{i}" for i in range(40)) for n in range(3)]
    for tokens in sequences:
        run(tokens)
    assert slots.saved == [sequences[1]]  # the first made room: 40 + 40 is over 60
    run(tuple(f"9-{i}" for i in range(20)), then=(*sequences[2], "more"))
    assert slots.saved == [sequences[2]]
    run(tuple(f"8-{i}" for i in range(20)))
    assert slots.saved == [(*sequences[2], "more")]  # it extends the one saved: that one goes


def test_ram_holds_tokens_by_the_models_size() -> None:
    assert ram_tokens(spec_for("qwen2.5:7b"), 8192) == 8192 * 2**20 // (16 * 3584)
    assert ram_tokens(spec_for("nomic-embed-text:latest"), 8192) == 0
    assert ram_tokens(spec_for("qwen2.5:7b"), 0) == 0
