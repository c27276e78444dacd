"""Prefix affinity: prompt blocks, what each backend may hold, and the routing it makes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from parallama.core.backends import Backend
from parallama.core.prefixes import PrefixMemory, prefix_blocks, shared_blocks
from parallama.core.scheduler import LOOKAHEAD, Scheduler
from parallama.core.tickets import Ticket
from parallama.protocol.ollama import kv_bytes_per_token
from tests.unit.schedulers import M, adds_up, make

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 40}  # ~1,100 bytes


def chat(*turns: str) -> list[dict[str, Any]]:
    """A conversation so far: the system prompt, then user and assistant in turn."""
    roles = ("user", "assistant")
    return [SYSTEM, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]


def test_a_conversation_that_grows_keeps_its_blocks_and_only_adds() -> None:
    first = prefix_blocks(M, chat("What is a KV cache? " * 10))
    later = prefix_blocks(M, chat("What is a KV cache? " * 10, "It is..." * 30, "And then?"))
    assert len(first) >= 5 and len(later) > len(first)
    assert later[: len(first)] == first
    assert shared_blocks(first, later) == len(first)
    other_question = prefix_blocks(M, chat("Something else entirely. " * 10))
    assert 0 < shared_blocks(first, other_question) < len(first)  # the system prompt only
    assert prefix_blocks("llama3.2:3b", chat("What is a KV cache? " * 10))[0] != first[0]
    assert prefix_blocks(M, None) == () and prefix_blocks(M, ["", "short"]) == ()


def test_shared_blocks_finds_the_first_difference() -> None:
    assert shared_blocks((1, 2, 3, 4), (1, 2, 9, 9, 9)) == 2
    assert shared_blocks((1, 2), (1, 2, 3)) == 2
    assert shared_blocks((), (1,)) == 0
    assert shared_blocks((5,), (1,)) == 0


def test_memory_keeps_what_each_slot_and_the_ram_cache_hold_as_ollama_and_llama_cpp_do() -> None:
    memory = PrefixMemory()  # llama.cpp's server: what Ollama runs since v0.30
    first, other = (1, 2), (7, 8)
    slots = [memory.take(M, first, slots=2), memory.take(M, other, slots=2)]
    assert memory.match(M, (1, 2, 3)) == 0  # both slots busy: their caches serve no other
    memory.release(M, slots[0], first)
    memory.release(M, slots[1], other)
    assert memory.match(M, (1, 2, 3, 4)) == 2 and memory.match(M, (7, 8, 9)) == 2
    later = (1, 2, 3)
    slot = memory.take(M, later, slots=2)  # the slot that holds its beginning
    assert slot == slots[0] and memory.match(M, (1, 2)) == 0
    memory.release(M, slot, later)
    assert memory.match(M, (1, 2, 3, 4)) == 3
    stranger = (5,)
    slot = memory.take(M, stranger, slots=2)  # shares nothing: the least recently used slot,
    memory.release(M, slot, stranger)  # whose 7 8 the engine saves in RAM first
    assert memory.match(M, (7, 8)) == 2 and memory.match(M, (1, 2, 3)) == 3
    memory.forget(M)
    assert memory.match(M, (1, 2, 3)) == 0


def test_memory_follows_older_ollamas_rule_when_told_one_sequence_a_slot() -> None:
    memory = PrefixMemory("ollama-legacy")
    first, other = (1, 2, 3), (7, 8)
    slots = [memory.take(M, first, slots=2), memory.take(M, other, slots=2)]
    for slot, sent in zip(slots, (first, other), strict=True):
        memory.release(M, slot, sent)
    slot = memory.take(M, (5,), slots=2)  # shares nothing: the first idle slot, not the LRU
    assert slot == slots[0]
    memory.release(M, slot, (5,))
    assert memory.match(M, (1, 2, 3)) == 0 and memory.match(M, (7, 8)) == 2  # no RAM cache


def test_memory_holds_in_ram_what_the_engines_cache_ram_holds() -> None:
    def saved_after_eviction(memory: PrefixMemory, blocks: int) -> int:
        first = tuple(range(blocks))
        slot = memory.take(M, first, slots=1)
        memory.release(M, slot, first)
        stranger = (-1,)
        slot = memory.take(M, stranger, slots=1)  # the one slot now holds another prompt
        memory.release(M, slot, stranger)
        return memory.match(M, first)

    assert saved_after_eviction(PrefixMemory(), 100) == 100  # 8 GiB by default
    assert saved_after_eviction(PrefixMemory(ram=0), 100) == 0  # --cache-ram 0
    # 16 MiB hold 256 tokens of a 7B model's KV (64 KiB each), 4 blocks of about 64 tokens
    assert saved_after_eviction(PrefixMemory(ram=16), 4) == 4
    assert saved_after_eviction(PrefixMemory(ram=16), 5) == 0
    # a model whose KV cache is half a 7B's: twice as many of its tokens
    assert saved_after_eviction(PrefixMemory(ram=16, kv_bytes={M: 32 * 1024}), 8) == 8
    assert saved_after_eviction(PrefixMemory(ram=16, kv_bytes={M: 32 * 1024}), 9) == 0


def test_a_models_kv_cache_per_token_is_read_from_ollamas_model_info() -> None:
    qwen = {  # qwen2.5:7b's, as Ollama's /api/show gives it (some keys)
        "general.architecture": "qwen2",
        "qwen2.block_count": 28,
        "qwen2.embedding_length": 3584,
        "qwen2.attention.head_count": 28,
        "qwen2.attention.head_count_kv": 4,
    }
    assert kv_bytes_per_token(qwen) == 28 * 4 * (128 + 128) * 2  # 56 KiB: f16 keys and values
    lengths = {"qwen2.attention.key_length": 192, "qwen2.attention.value_length": 128}
    assert kv_bytes_per_token(qwen | lengths) == 28 * 4 * (192 + 128) * 2
    per_layer = qwen | {"qwen2.block_count": 3, "qwen2.attention.head_count_kv": [4, 0, 8]}
    assert kv_bytes_per_token(per_layer) == 12 * 256 * 2  # layers without KV heads keep none
    no_kv_heads = {k: v for k, v in qwen.items() if k != "qwen2.attention.head_count_kv"}
    assert kv_bytes_per_token(no_kv_heads) == 28 * 28 * 256 * 2  # as many as attention heads
    broken_ones: list[object] = [
        None,
        [],
        {},
        {"general.architecture": 7},
        qwen | {"qwen2.block_count": None},
        qwen | {"qwen2.block_count": True},
        qwen | {"qwen2.attention.head_count_kv": "4"},
        qwen | {"qwen2.attention.head_count": 0},
        qwen | {"qwen2.block_count": 10**9},  # no engine keeps 14 GB a token
        qwen | {"qwen2.block_count": 1, "qwen2.attention.head_count_kv": 1},  # 512 bytes
        qwen | {"qwen2.attention.head_count_kv": [True, True]},
        qwen | {"qwen2.block_count": -28, "qwen2.attention.head_count_kv": -4},
    ]
    for broken in broken_ones:
        assert kv_bytes_per_token(broken) is None, broken


def test_the_ram_cache_holds_more_once_a_small_models_kv_size_is_known() -> None:
    s = make(Backend("a", slots=1, cache_ram=16), routing="prefix-affinity")  # 4 blocks of a 7B's
    first, stranger = tuple(range(6)), (-1,)
    busy_with(s, first)
    busy_with(s, stranger)  # pushes `first` out of the one slot: 6 blocks do not fit in RAM
    memory = s._router.prefixes(s.backends["a"])
    assert memory.match(M, first) == 0
    s.learn_kv_bytes(M, 16 * 1024)  # a small model: 16 blocks fit
    assert s.kv_bytes(M) == 16 * 1024 and memory.ram_blocks(M) == 16
    assert memory.match(M, stranger) == 1  # what the slot holds is kept
    busy_with(s, first)
    busy_with(s, stranger)
    assert memory.match(M, first) == 6


def busy_with(s: Scheduler, prefix: tuple[int, ...]) -> Ticket:
    ticket = s.submit(M, prefix=prefix)
    s.release(ticket)  # answered: the model is loaded there, its slot holds the prefix
    return ticket


def test_a_request_goes_where_its_prefix_is_cached_unless_that_is_much_busier() -> None:
    a, b = Backend("a", slots=4), Backend("b", slots=4)
    s = make(a, b, routing="prefix-affinity", prefix_balance=0.5)
    for backend in (a, b):
        s.set_loaded(backend.name, [M])  # else least-loaded itself prefers where it is loaded
    conversation = prefix_blocks(M, chat("Tell me about caches. " * 20))
    assert busy_with(s, conversation).backend is a
    s.observe_busy("a", 2)  # other clients keep two of a's slots busy
    later = prefix_blocks(M, chat("Tell me about caches. " * 20, "Sure. " * 50, "More?"))
    turn = s.submit(M, prefix=later)
    assert turn.backend is a  # cached there: half its slots busier than b is within the bound
    s.release(turn)
    s.observe_busy("a", 3)  # three quarters busier: over the bound
    again = prefix_blocks(M, chat("Tell me about caches. " * 20, "Sure. " * 50, "More?", "Ok", "?"))
    assert s.submit(M, prefix=again).backend is b


def test_with_nothing_cached_it_is_least_loaded_and_an_unloaded_model_holds_nothing() -> None:
    a, b = Backend("a", slots=4), Backend("b", slots=4)
    s = make(a, b, routing="prefix-affinity")
    for backend in (a, b):
        s.set_loaded(backend.name, [M])
    blocks = tuple(range(1, 6))
    assert busy_with(s, blocks).backend is a
    stranger = s.submit(M, prefix=(99,))
    assert stranger.backend is a  # nothing cached for it: least loaded (a by name)
    assert s.submit(M, prefix=(98,)).backend is b
    returning = s.submit(M, prefix=blocks)
    assert returning.backend is a  # cached on a, though as busy as b
    # a unloads the model once its requests are done (an eviction, seen by a probe): the
    # cache went with it, and least-loaded prefers b, where the model is loaded.
    s.release(stranger)
    s.release(returning)
    s.set_loaded("a", [])
    assert s.submit(M, prefix=blocks).backend is b


def test_a_freed_slot_goes_to_a_waiting_request_that_shares_its_prefix_but_not_for_ever() -> None:
    a = Backend("a", slots=1)
    s = make(a, routing="prefix-affinity")
    s.set_loaded("a", [M])
    ours = (1, 2, 3, 4)
    running = s.submit(M, prefix=ours)  # a's slot will hold this prefix
    stranger = s.submit(M, prefix=(7, 8, 9))
    returning = s.submit(M, prefix=(*ours, 5))
    s.release(running)
    assert returning.backend is a and stranger.queued  # it shares a's prefix: first
    assert stranger.skipped == 1
    # Passed over LOOKAHEAD times, the head goes first whatever the others share.
    stranger.skipped = LOOKAHEAD
    another = s.submit(M, prefix=(*ours, 5, 6))
    s.release(returning)
    assert stranger.backend is a and another.queued


def test_a_burst_sharing_a_prefix_being_computed_follows_it_waits_then_spreads() -> None:
    """Agent sessions sharing a long system prompt: while the first computes it on a, the next
    takes a's other slot (which needs its own copy), the ones after wait for a's slots instead
    of computing it on a backend that does not hold it, as many as a has slots; past that the
    prefix spreads to one more backend. A prompt of its own waits for nobody."""
    a, b, c = Backend("a", slots=2), Backend("b", slots=2), Backend("c", slots=2)
    s = make(a, b, c, routing="prefix-affinity", prefix_wait=0.25)
    for backend in (a, b, c):
        s.set_loaded(backend.name, [M])
    system = tuple(range(1, 33))  # 32 blocks: some 2,000 tokens
    first = s.submit(M, prefix=(*system, 100))
    second = s.submit(M, prefix=(*system, 200))
    assert first.backend is a and second.backend is a
    third, fourth = s.submit(M, prefix=(*system, 300)), s.submit(M, prefix=(*system, 400))
    assert third.queued and fourth.queued
    stranger = s.submit(M, prefix=(900, 901, 902, 903, 904))  # three wait, for two slots:
    assert third.backend is b and fourth.backend is b  # the prefix spreads to b, then a prompt
    assert stranger.backend is c  # of its own goes where it is least loaded
    fifth = s.submit(M, prefix=(*system, 500))
    assert fifth.queued
    s.release(first)  # a's slot holds the system prompt: the waiting one takes it
    assert fifth.backend is a and adds_up(s)


def test_the_lookahead_never_sends_a_request_back_to_the_backend_it_failed_on() -> None:
    a, b = Backend("a", slots=1), Backend("b", slots=1)
    s = make(a, b, routing="prefix-affinity")
    ours = (1, 2, 3, 4)
    done = s.submit(M, prefix=ours)
    s.release(done)  # a's slot holds `ours`
    s.observe_busy("a", 1)  # another client keeps a busy a while
    on_b = s.submit(M, prefix=(9,))
    head = s.submit(M, prefix=(7,))
    failed = s.submit(M, prefix=(*ours, 5))  # behind the head: shares a's slot entirely
    failed.avoid = frozenset({"a"})  # as a requeue after a failure on a leaves it
    s.observe_busy("a", 0)  # a frees: the lookahead may pass the head over, but not for a
    assert head.backend is a and failed.queued
    s.release(on_b)
    assert failed.backend is b


def test_a_policy_changed_while_requests_run_leaves_no_slot_busy_for_ever() -> None:
    other, holder = Backend("a", slots=1), Backend("x", slots=1)
    s = make(other, holder, routing="prefix-affinity")
    for backend in (other, holder):
        s.set_loaded(backend.name, [M])
    elsewhere = s.submit(M, prefix=(9,))
    running = s.submit(M, prefix=(1, 2))
    assert (elsewhere.backend, running.backend) == (other, holder)
    s.settings = replace(s.settings, routing="least-loaded")  # a reload
    s.release(running)
    s.release(elsewhere)
    s.settings = replace(s.settings, routing="prefix-affinity")  # and back
    # x's slot was let go, holding (1, 2): found there, though least-loaded would say a.
    assert s.submit(M, prefix=(1, 2, 3)).backend is holder


def test_a_turn_granted_to_a_client_across_gateways_is_not_given_to_another() -> None:
    a = Backend("a", slots=1)
    s = make(a, routing="prefix-affinity", discipline="fair", shared_slots=True)
    s.set_loaded("a", [M])
    first = s.submit(M, client="c1", prefix=(1, 2))
    s.grant("a", M, client="c1")
    assert first.backend is a
    s.release(first)
    mine = s.submit(M, client="c1", prefix=(8,))
    cached = s.submit(M, client="c2", prefix=(1, 2, 3))  # shares a's slot: would be preferred
    s.grant("a", M, client="c1")  # the shared order says: c1's turn
    assert mine.backend is a and cached.queued
