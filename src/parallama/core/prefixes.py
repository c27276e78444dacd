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
ran, and gives a new request the free slot with the longest common prefix, which it then
overwrites. `PrefixMemory` keeps the same per backend and model: the last `slots` sequences sent
there; a new one replaces the sequence it extends most, else the least recently used. A model
unloaded from a backend takes its cache with it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

BLOCK = 256  # bytes of rendered prompt per block: about 64 tokens
MAX_BLOCKS = 4096  # per request: 1 MiB of prompt; what comes after is not matched
MAX_MODELS = 16  # per backend: models remembered (clients name them)

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
    """What one backend's slots may hold: per model, its last sequences, most recent last."""

    def __init__(self) -> None:
        self._models: OrderedDict[str, list[Blocks]] = OrderedDict()

    def match(self, model: str, wanted: Blocks) -> int:
        """Blocks of `wanted` that the backend may still have cached for `model`."""
        sequences = self._models.get(model, ())
        return max((shared_blocks(s, wanted) for s in sequences), default=0)

    def remember(self, model: str, sent: Blocks, slots: int) -> None:
        """`sent` was given to the backend: it takes the place of the sequence it extends most
        (that slot's cache is reused and overwritten), else of the least recently used one."""
        if not sent:
            return
        sequences = self._models.setdefault(model, [])
        self._models.move_to_end(model)
        best = max(
            range(len(sequences)), key=lambda i: shared_blocks(sequences[i], sent), default=None
        )
        if best is not None and shared_blocks(sequences[best], sent):
            del sequences[best]
        elif len(sequences) >= max(slots, 1):
            del sequences[0]
        sequences.append(sent)
        while len(self._models) > MAX_MODELS:
            self._models.popitem(last=False)

    def forget(self, model: str) -> None:
        """The model was unloaded: its cache went with it."""
        self._models.pop(model, None)

    def models(self) -> list[str]:
        return list(self._models)
