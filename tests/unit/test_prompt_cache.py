"""The emulator's prompt cache: llama.cpp's server's slot choice, as Ollama runs it."""

from __future__ import annotations

from parallama.sim.prompt_cache import SlotCaches, common_prefix

SYSTEM = tuple(f"s{i}" for i in range(50))


def test_a_conversations_next_turn_finds_its_slot_and_evaluates_only_the_new_part() -> None:
    caches = SlotCaches(2)
    first = (*SYSTEM, "q1")
    slot, cached = caches.take(first)
    assert cached == 0
    caches.give_back(slot, (*first, "a1", "a1b"))  # the prompt and the answer
    second = (*first, "a1", "a1b", "q2")
    assert caches.take(second) == (slot, len(second) - 1)


def test_the_last_prompt_token_is_always_evaluated_and_busy_slots_are_not_shared() -> None:
    caches = SlotCaches(2)
    slot, _ = caches.take(SYSTEM)
    caches.give_back(slot, SYSTEM)
    assert caches.take(SYSTEM) == (slot, len(SYSTEM) - 1)
    other, cached = caches.take(SYSTEM)  # the cached slot is busy: the other, empty one
    assert (other, cached) == (1 - slot, 0)
    assert caches.take(SYSTEM) == (-1, 0)  # none idle


def test_a_small_overlap_goes_to_the_least_recently_used_slot() -> None:
    caches = SlotCaches(2)
    for slot_tokens in (("a",) * 40, ("b",) * 40):
        slot, _ = caches.take(slot_tokens)
        caches.give_back(slot, slot_tokens)
    # 3 of 40 shared with the second slot: not over a tenth, so the least recently used idle
    # slot, the first, is taken (and overwritten), with nothing cached.
    prompt = ("b",) * 3 + ("c",) * 37
    assert caches.take(prompt) == (0, 0)
    assert caches.take(("b",) * 5 + ("c",) * 35) == (1, 5)  # over a tenth: that slot
    assert common_prefix(("x", "y"), ("x", "z")) == 1
