"""Which backend may still hold a request's prompt prefix in its KV cache (sans-I/O), for the
`prefix-affinity` routing policy.

A request's prompt material (its messages, or its system and prompt) is rendered as JSON, whose
bytes only grow at the end as a conversation goes on, and cut into `BLOCK` bytes; each full block
is hashed together with the hash before it (as vLLM's prefix caching hashes token blocks), so
that two requests share their first `n` blocks exactly when their `n`th hashes are equal. No
tokenizer is needed, and no prompt text is kept: only 64-bit hashes. The hash is Python's own
(SipHash, keyed anew in every process, so nobody can aim collisions at it): four times as fast as
blake2b here, and the record lives in one process anyway.

An engine such as Ollama or llama.cpp's server keeps, per slot, the sequence that slot last
ran, and gives a new request the idle slot with the longest common prefix, which it then
overwrites. `PrefixMemory` keeps the same per backend and model, from what the gateway sent
there and when each request ended. A model unloaded from a backend takes its cache with it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

BLOCK = 256  # bytes of rendered prompt per block: about 64 tokens
MAX_BLOCKS = 4096  # per request: 1 MiB of prompt; what comes after is not matched
MAX_MODELS = 16  # per backend: models remembered (clients name them)
SIMILARITY = 0.1  # llama.cpp server's --slot-prompt-similarity: less shared is no match

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


@dataclass(slots=True)
class _Slot:
    blocks: Blocks = ()  # what it holds: the prompt last sent to it
    busy: bool = False
    used: int = 0  # when it was last taken


class PrefixMemory:
    """What one backend's slots may hold, per model, kept as the engine keeps it: a request
    takes the idle slot that shares the most of its prompt (over `SIMILARITY` of it), else the
    least recently used idle one, and overwrites it; a busy slot's cache is no use to others."""

    def __init__(self) -> None:
        self._models: OrderedDict[str, list[_Slot]] = OrderedDict()
        self._uses = 0

    def match(self, model: str, wanted: Blocks) -> int:
        """Blocks of `wanted` that an idle slot of the backend may hold for `model`."""
        slots = self._models.get(model, ())
        return max((shared_blocks(s.blocks, wanted) for s in slots if not s.busy), default=0)

    def take(self, model: str, sent: Blocks, slots: int) -> None:
        """`sent` was given to the backend, which has `slots` slots for `model`."""
        held = self._models.setdefault(model, [])
        self._models.move_to_end(model)
        while len(self._models) > MAX_MODELS:
            self._models.popitem(last=False)
        del held[max(slots, 1) :]
        held += [_Slot() for _ in range(max(slots, 1) - len(held))]
        idle = [slot for slot in held if not slot.busy]
        if not idle:  # more at once than its slots (outside clients): nothing to tell
            return
        best = max(idle, key=lambda slot: shared_blocks(slot.blocks, sent))
        if not sent or shared_blocks(best.blocks, sent) / len(sent) <= SIMILARITY:
            best = min(idle, key=lambda slot: slot.used)
        self._uses += 1
        best.blocks, best.busy, best.used = sent, True, self._uses

    def release(self, model: str, sent: Blocks) -> None:
        """The request sent with `sent` ended: its slot is idle, and holds it."""
        for slot in self._models.get(model, ()):
            if slot.busy and slot.blocks is sent:
                slot.busy = False
                return

    def forget(self, model: str) -> None:
        """The model was unloaded: its cache went with it."""
        self._models.pop(model, None)

    def models(self) -> list[str]:
        return list(self._models)
