"""The prompt (KV) cache of one loaded model's slots, as Ollama's engine keeps it (sans-I/O).

Ollama runs llama.cpp's server with `cache_prompt` on and `OLLAMA_NUM_PARALLEL` slots. Each slot
keeps the tokens of the last sequence it ran, its prompt and what it generated. A new request
takes the idle slot whose tokens share the largest part of its prompt as a common prefix, if
that is over a tenth of the prompt (`--slot-prompt-similarity`, 0.1); else the least recently
used idle slot. The shared prefix is not evaluated again, but for its last token, which always
is. A model loaded anew starts with empty slots.
"""

from __future__ import annotations

from collections.abc import Sequence

SIMILARITY = 0.1  # llama.cpp server's default --slot-prompt-similarity


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SlotCaches:
    def __init__(self, slots: int) -> None:
        self._held: list[Sequence[str]] = [() for _ in range(slots)]
        self._busy = [False] * slots
        self._last_used = [0] * slots
        self._uses = 0

    def take(self, prompt: Sequence[str]) -> tuple[int, int]:
        """A slot for `prompt`, and how many of its tokens are cached there."""
        idle = [i for i, busy in enumerate(self._busy) if not busy]
        if not idle:  # more requests than slots (the scheduler prevents it): no cache
            return -1, 0
        shared = {i: common_prefix(self._held[i], prompt) for i in idle}
        best = max(idle, key=lambda i: shared[i])  # the first of equals, as llama.cpp's server
        if not prompt or shared[best] / len(prompt) <= SIMILARITY:
            best = min(idle, key=lambda i: self._last_used[i])
        self._busy[best] = True
        cached = shared[best]
        return best, min(cached, len(prompt) - 1) if prompt else 0

    def give_back(self, slot: int, sequence: Sequence[str]) -> None:
        """The slot is idle again, holding `sequence` (the prompt and the tokens generated)."""
        if slot < 0:
            return
        self._held[slot] = sequence
        self._busy[slot] = False
        self._uses += 1
        self._last_used[slot] = self._uses
