"""The emulator runs its engines' prompt cache rules (`core.kv_slots`) on token lists."""

from __future__ import annotations

from collections.abc import Sequence

from parallama.sim.catalog import ModelSpec


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def ram_tokens(spec: ModelSpec, cache_ram_mib: int) -> int:
    """How many tokens of KV cache `cache_ram_mib` of host RAM holds for the model (qwen2.5:7b
    keeps 56 KiB a token, llama3.1:8b 128 KiB). Embedding models keep none."""
    if spec.is_embedding or cache_ram_mib <= 0:
        return 0
    return cache_ram_mib * 2**20 // spec.kv_bytes_per_token
