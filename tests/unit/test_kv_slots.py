"""Engines' prompt caches (llama.cpp server's slots and host-RAM cache, which Ollama runs since
v0.30; the slots of Ollama's own runners before it), as the emulator and the gateway run them."""

from __future__ import annotations

from parallama.core.kv_slots import CacheRule, EngineSlots
from parallama.sim.catalog import spec_for
from parallama.sim.prompt_cache import common_prefix, ram_tokens

Tokens = tuple[str, ...]
SYSTEM: Tokens = tuple(f"s{i}" for i in range(50))


def engine(slots: int, budget: int = 0, rule: CacheRule = "llama-server") -> EngineSlots[Tokens]:
    return EngineSlots(slots, common_prefix, rule, budget)


def test_ollama_legacy_takes_the_idle_slot_sharing_most_else_always_the_first() -> None:
    slots = engine(2, rule="ollama-legacy")
    first = (*SYSTEM, "q1")
    assert slots.take(first) == (0, 0)
    stranger = ("x",) * 60
    assert slots.take(stranger) == (1, 0)  # the first idle one: slot 0 is busy
    slots.give_back(0, (*first, "a1"))
    slots.give_back(1, stranger)
    other = (*SYSTEM, "another question")
    assert slots.take(other) == (0, len(SYSTEM))  # the longest shared prefix: slot 0's
    slots.give_back(0, other)  # the first conversation's turn is gone from slot 0
    assert slots.found((*first, "a1", "q2")) == len(SYSTEM)
    unrelated = ("y",) * 60
    assert slots.take(unrelated) == (0, 0)  # nothing shared: the first idle slot, not the LRU
    assert slots.found(stranger) == len(stranger)  # slot 1 kept its sequence all along
    assert slots.saved == []  # and no host-RAM cache, whatever the budget


def test_ollama_legacy_multiuser_copies_the_longest_prefix_into_the_lru_slot() -> None:
    slots = engine(2, rule="ollama-legacy-multiuser")
    first = (*SYSTEM, "q1", "a1")
    assert slots.take(first[:-1]) == (0, 0)
    slots.give_back(0, first)
    other = (*SYSTEM, "another question")
    # Slot 0 shares the system prompt, but `other` does not extend all it holds: the least
    # recently used slot (1, never used) is taken, and the system prompt copied into it.
    assert slots.take(other) == (1, len(SYSTEM))
    assert slots.take((*first, "q2")) == (0, len(first))  # slot 0 kept the conversation
    slots.give_back(0, (*first, "q2"))
    assert slots.found(first) == len(first)
    # Only busy slots share anything: nothing to take.
    slots.give_back(1, other)
    assert slots.take(other) == (1, len(other))
    assert slots.take(("z",) * 5) == (0, 0)
    assert slots.take(other) == (-1, 0)


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


def test_idle_slots_are_saved_in_ram_as_a_request_starts_so_a_takeover_loses_nothing() -> None:
    """llama-server's `--cache-idle-slots`: a conversation sharing the system prompt takes over
    a slot without saving it (it keeps over half of it), yet the slot's last conversation was
    saved when the other slot's request started, and comes back from RAM for its next turn."""
    slots = engine(2, budget=10_000)
    ours = (*SYSTEM, "q1", "a1")
    slot, _ = slots.take(ours[:-1])
    slots.give_back(slot, ours)
    elsewhere, _ = slots.take(tuple(f"x{i}" for i in range(60)))  # the other slot starts
    assert slots.saved == [ours]
    assert slots.take((*SYSTEM, "another question")) == (slot, len(SYSTEM))  # a takeover
    slots.give_back(slot, (*SYSTEM, "another question"))
    slots.give_back(elsewhere, tuple(f"x{i}" for i in range(60)))
    assert slots.found((*ours, "q2")) == len(ours)


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
    # 28 layers of 4 KV heads of 128, a key and a value in f16 each: 56 KiB a token
    assert ram_tokens(spec_for("qwen2.5:7b"), 8192) == 8192 * 1024 // 56
    # 32 layers of 8 KV heads of 128: 128 KiB
    assert ram_tokens(spec_for("llama3.1:8b"), 8192) == 65_536
    assert ram_tokens(spec_for("nomic-embed-text:latest"), 8192) == 0
    assert ram_tokens(spec_for("qwen2.5:7b"), 0) == 0


def test_a_taken_slot_keeps_only_the_prefix_it_shares_as_ollama_cuts_it() -> None:
    # Ollama's LoadCacheSlot cuts a slot to the shared prefix as it takes it: a busy slot's
    # old sequence is gone, and OLLAMA_MULTIUSER_CACHE copies only what is left of it.
    slots = engine(2, rule="ollama-legacy-multiuser")
    first = (*SYSTEM, "a1", "a2")
    assert slots.take(first) == (0, 0)
    slots.give_back(0, first)
    stranger = ("x",) * 10
    assert slots.take(stranger) == (1, 0)
    slots.give_back(1, stranger)
    # The system prompt is in slot 0, which is also the least recently used: taken and cut.
    assert slots.take((*SYSTEM, "c1")) == (0, len(SYSTEM))
    assert slots.found((*first, "q2")) == len(SYSTEM)  # not first's turn: gone from slot 0
    assert slots.take((*first, "q2")) == (1, len(SYSTEM))  # the system prompt copied over
