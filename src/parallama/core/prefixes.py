"""Which backend may still hold a request's prompt prefix in its KV cache (sans-I/O), for the
`prefix-affinity` routing policy.

A request's prompt material (its messages, or its system and prompt) is rendered as JSON, whose
bytes only grow at the end as a conversation goes on, and cut into `BLOCK` bytes; each full block
is hashed together with the hash before it (as vLLM's prefix caching hashes token blocks), so
that two requests share their first `n` blocks exactly when their `n`th hashes are equal. No
tokenizer is needed, and no prompt text is kept: only 64-bit hashes. The hash is Python's own
(SipHash, keyed anew in every process, so nobody can aim collisions at it): four times as fast as
blake2b here, and the record lives in one process anyway.

Engines keep, per slot, the sequence that slot last ran, and llama.cpp's server also prompts
saved from slots in host RAM; which slot a request takes is each engine's own rule
(`core.kv_slots`). `PrefixMemory` runs the backend's rules per model on what the gateway sent
there and when each request ended.
A model unloaded from a backend takes its cache with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

from parallama.core.kv_slots import CacheRule, EngineSlots

BLOCK = 256  # bytes of rendered prompt per block: about 64 tokens
MAX_BLOCKS = 4096  # per request: 1 MiB of prompt; what comes after is not matched
MAX_MODELS = 16  # per backend: models remembered (clients name them)
TOKENS_PER_BLOCK = 64
# A model's KV cache per token till its own is known: between qwen2.5:7b's 56 KiB and
# llama3.1:8b's 128 KiB (f16).
KV_BYTES_PER_TOKEN = 64 * 1024
MAX_RAM_BLOCKS = 16384  # saved prompt blocks per backend and model: a million tokens

Blocks = tuple[int, ...]


def prefix_blocks(model: str, material: Any) -> Blocks:
    """The chained hashes of the full blocks of `material` (JSON-able: a message list, or a
    system prompt and prompt), seeded with the model name: caches are per model."""
    if material is None:
        return ()
    rendered = orjson.dumps(material)
    previous = hash(model)
    hashes = []
    for start in range(0, min(len(rendered) // BLOCK, MAX_BLOCKS) * BLOCK, BLOCK):
        previous = hash((previous, rendered[start : start + BLOCK]))
        hashes.append(previous)
    return tuple(hashes)


def shared_blocks(cached: Blocks, wanted: Blocks) -> int:
    """How many first blocks the two sequences share: chained hashes are equal up to the first
    difference and differ after it, so a binary search finds it."""
    low, high = 0, min(len(cached), len(wanted))
    while low < high:
        middle = (low + high + 1) // 2
        if cached[middle - 1] == wanted[middle - 1]:
            low = middle
        else:
            high = middle - 1
    return low


class PrefixMemory:
    """What one backend may hold, per model: the engine's slots (and host-RAM prompt cache) by
    its `rule` (`core.kv_slots`), run on what the gateway sent there and when each request
    ended."""

    def __init__(
        self,
        rule: CacheRule = "llama-server",
        ram: int = 8192,
        kv_bytes: Mapping[str, int] | None = None,
    ) -> None:
        """`ram`: MiB of host-RAM prompt cache (llama.cpp's `--cache-ram`); `kv_bytes`: each
        model's KV cache per token, where known (8 GiB, the default, holds some 130,000 tokens
        at `KV_BYTES_PER_TOKEN`: 2,048 blocks)."""
        self.rule = rule
        self.ram = ram
        self._kv_bytes = {} if kv_bytes is None else kv_bytes  # shared: learnt later
        self._models: OrderedDict[str, EngineSlots[Blocks]] = OrderedDict()

    def match(self, model: str, wanted: Blocks) -> int:
        """Blocks of `wanted` that the backend may still hold for `model`."""
        engine = self._models.get(model)
        return 0 if engine is None else engine.found(wanted)

    def match_running(self, model: str, wanted: Blocks) -> int:
        """Blocks of `wanted` that a request running there now shares."""
        engine = self._models.get(model)
        return 0 if engine is None else engine.found_running(wanted)

    def take(self, model: str, sent: Blocks, slots: int) -> int:
        """`sent` was given to the backend, which has `slots` slots for `model`: the slot it
        takes there (-1: more at once than its slots, nothing to tell)."""
        engine = self._models.get(model)
        if engine is None:
            engine = self._models[model] = EngineSlots(
                slots, shared_blocks, self.rule, self.ram_blocks(model)
            )
            while len(self._models) > MAX_MODELS:
                self._models.popitem(last=False)
        self._models.move_to_end(model)
        engine.resize(slots)
        return engine.take(sent)[0]

    def ram_blocks(self, model: str) -> int:
        """How many blocks of `model`'s prompts the host-RAM cache holds."""
        per_token = self._kv_bytes.get(model, KV_BYTES_PER_TOKEN)
        return min(self.ram * 2**20 // (per_token * TOKENS_PER_BLOCK), MAX_RAM_BLOCKS)

    def rebudget(self, model: str) -> None:
        """The model's KV size became known: what the RAM cache holds of it is counted anew
        (what it keeps now stays, up to the new size, the oldest dropped first)."""
        engine = self._models.get(model)
        if engine is not None:
            engine.set_budget(self.ram_blocks(model))

    def release(self, model: str, slot: int, sent: Blocks) -> None:
        """The request sent with `sent` ended: its slot is idle, and holds it."""
        engine = self._models.get(model)
        if engine is not None:
            engine.give_back(slot, sent)

    def forget(self, model: str) -> None:
        """The model was unloaded: its cache went with it."""
        self._models.pop(model, None)

    def models(self) -> list[str]:
        return list(self._models)
