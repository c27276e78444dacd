"""An engine's prompt (KV) cache for one loaded model, by the rules of the engine that keeps it
(sans-I/O). The emulator runs it on token lists, to time prefills as the engine would; the gateway
runs it on prompt block hashes (`core.prefixes`), to guess what each backend holds.

In every engine each slot keeps the sequence it ran last (prompt and answer), and the part of a
prompt that its slot holds as a common prefix is not evaluated again. Which slot a request takes:

- `llama-server`: llama.cpp's server (`get_available_slot`, `server_prompt_cache`), which Ollama
  runs for every model since v0.30 (`-np OLLAMA_NUM_PARALLEL`, no `--cache-ram`): the idle slot
  sharing the largest part of the prompt, over `SIMILARITY` of it (the first of equals), else the
  least recently used idle slot. When it took the least recently used slot, or one whose
  sequence it keeps less than half of, that sequence is first saved to the host-RAM prompt cache
  (`--cache-ram`, 8 GiB by default: oldest dropped first, a sequence that another extends
  dropped as obsolete), and the saved sequence that serves the request best (keeping at least a
  quarter of it, and more of both it and the prompt than the slot's own) is restored into the
  slot, and leaves the cache. And as each request starts, every idle slot's sequence is saved
  there too (`--cache-idle-slots`, on by default), so that a slot another conversation takes
  over later keeps its last one in RAM.
- `ollama-legacy`: Ollama's own runners before v0.30 (`runner/ollamarunner/cache.go`,
  `findLongestCacheSlot`): the idle slot sharing the longest prefix with the prompt, the first
  of equals (so the first idle slot when none shares anything). No host-RAM cache.
- `ollama-legacy-multiuser` (those runners with `OLLAMA_MULTIUSER_CACHE=1`,
  `findBestCacheSlot`): the slot sharing the longest prefix if it is idle and the prompt extends
  all it holds; else the least recently used idle slot, into which that longest prefix is
  copied from its slot (busy or not).

A slot taken keeps only the prefix it shares (Ollama's `LoadCacheSlot` cuts it so, and llama.cpp
overwrites the rest), then what the request adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Literal, TypeVar, cast

S = TypeVar("S", bound=Sequence[object])
CacheRule = Literal["llama-server", "ollama-legacy", "ollama-legacy-multiuser"]
CACHE_RULES: tuple[CacheRule, ...] = ("llama-server", "ollama-legacy", "ollama-legacy-multiuser")

SIMILARITY = 0.1  # --slot-prompt-similarity's default
KEEP_SLOT = 0.5  # a slot kept less than this much of is saved first
KEEP_SAVED = 0.25  # a saved sequence must be kept this much of to be restored


class EngineSlots(Generic[S]):
    def __init__(
        self,
        slots: int,
        shared: Callable[[S, S], int],
        rule: CacheRule = "llama-server",
        saved_budget: int = 0,
    ) -> None:
        """`shared`: the length of two sequences' common prefix; `saved_budget`: how long the
        sequences saved in host RAM may be together (`llama-server` only; 0: no RAM cache)."""
        self._shared = shared
        self.rule = rule
        self.held: list[S | None] = [None] * max(slots, 1)
        self.running: list[S | None] = [None] * max(slots, 1)  # a busy slot's whole prompt
        self._busy = [False] * max(slots, 1)
        self._used = [0] * max(slots, 1)
        self._uses = 0
        self.saved: list[S] = []  # oldest first
        self.set_budget(saved_budget)

    def set_budget(self, saved_budget: int) -> None:
        """How long the sequences saved in host RAM may now be together."""
        self.budget = saved_budget if self.rule == "llama-server" else 0
        self._make_room(0)

    def _make_room(self, length: int) -> None:
        """Drop the oldest saved sequences till one of `length` fits beside the rest."""
        total = sum(map(len, self.saved)) + length
        while self.saved and total > self.budget:
            total -= len(self.saved.pop(0))

    def resize(self, slots: int) -> None:
        """The engine's slots are now `slots` (busy ones are kept)."""
        slots = max(slots, 1)
        while len(self.held) < slots:
            self.held.append(None)
            self.running.append(None)
            self._busy.append(False)
            self._used.append(0)
        while len(self.held) > slots and not self._busy[-1]:
            self.held.pop()
            self.running.pop()
            self._busy.pop()
            self._used.pop()

    def found(self, prompt: S) -> int:
        """How much of `prompt` a request would find cached now."""
        if self.rule == "ollama-legacy-multiuser":
            return max((self._of(i, prompt) for i in range(len(self.held))), default=0)
        best = max((self._of(i, prompt) for i in self._idle()), default=0)
        for entry in self.saved:
            shared = self._shared(entry, prompt)
            if shared >= KEEP_SAVED * len(entry):
                best = max(best, shared)
        return best

    def found_running(self, prompt: S) -> int:
        """How much of `prompt` the requests running now share with it: what a slot will hold
        once one of them ends (no engine shares a prompt between slots while they run)."""
        shared = (self._shared(p, prompt) for p in self.running if p is not None)
        return max(shared, default=0)

    def take(self, prompt: S) -> tuple[int, int]:
        """The slot a request for `prompt` takes, and how much of the prompt it holds; slot -1
        if none is idle (more requests than slots: nothing is cached)."""
        idle = self._idle()
        if not idle:
            return -1, 0
        if self.rule == "ollama-legacy":
            slot = max(idle, key=lambda i: self._of(i, prompt))  # the first of equals
        elif self.rule == "ollama-legacy-multiuser":
            slot = self._best_or_forked(idle, prompt)
        else:
            slot = self._similar_or_oldest(idle, prompt)
        shared = self._of(slot, prompt)
        self.held[slot] = cast(S, prompt[:shared])
        self.running[slot] = prompt
        self._busy[slot] = True
        self._uses += 1
        self._used[slot] = self._uses
        if self.rule == "llama-server" and self.budget > 0:
            for other in self._idle():  # --cache-idle-slots
                self._save(other)
        return slot, shared

    def _best_or_forked(self, idle: list[int], prompt: S) -> int:
        shared = [self._of(i, prompt) for i in range(len(self.held))]
        longest = max(range(len(self.held)), key=shared.__getitem__)
        held = self.held[longest]
        if longest in idle and shared[longest] == (len(held) if held else 0):
            return longest
        oldest = min(idle, key=lambda i: self._used[i])
        if shared[longest] > 0 and held is not None and oldest != longest:
            self.held[oldest] = cast(S, held[: shared[longest]])
        return oldest

    def _similar_or_oldest(self, idle: list[int], prompt: S) -> int:
        shared = {i: self._of(i, prompt) for i in idle}
        similar = [i for i in idle if self.held[i] and shared[i] > SIMILARITY * len(prompt)]
        if similar:
            slot = max(similar, key=shared.__getitem__)
            held = self.held[slot]
            assert held is not None
            refresh = shared[slot] < KEEP_SLOT * len(held)
        else:
            slot = min(idle, key=lambda i: self._used[i])
            refresh = True
        if refresh and self.budget > 0:
            self._save(slot)
            self._restore(slot, prompt)
        return slot

    def give_back(self, slot: int, sequence: S) -> None:
        """The slot is idle again, holding `sequence`."""
        if 0 <= slot < len(self.held):
            self.held[slot] = sequence
            self.running[slot] = None
            self._busy[slot] = False

    def _idle(self) -> list[int]:
        return [i for i, busy in enumerate(self._busy) if not busy]

    def _of(self, slot: int, prompt: S) -> int:
        held = self.held[slot]
        return 0 if held is None else self._shared(held, prompt)

    def _save(self, slot: int) -> None:
        held = self.held[slot]
        if not held or any(self._shared(e, held) == len(held) for e in self.saved):
            return  # nothing, or already there
        if len(held) > self.budget:
            return
        self.saved = [e for e in self.saved if self._shared(e, held) < len(e)]  # obsolete
        self._make_room(len(held))
        self.saved.append(held)

    def _restore(self, slot: int, prompt: S) -> None:
        held = self.held[slot]
        kept = self._of(slot, prompt)
        best_keep = kept / len(held) if held else -1.0
        best_sim = kept / len(prompt) if prompt else 0.0
        chosen = None
        for entry in self.saved:
            shared = self._shared(entry, prompt)
            keep, sim = shared / len(entry), shared / len(prompt) if prompt else 0.0
            if keep >= KEEP_SAVED and keep > best_keep and sim > best_sim:
                best_keep, best_sim, chosen = keep, sim, entry
        if chosen is not None:
            self.saved.remove(chosen)
            self.held[slot] = chosen
