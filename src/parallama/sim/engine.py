"""Drives the sans-I/O scheduler and timing model in real time on an asyncio loop.

The scheduler decides *who* may run; this module turns its decisions into awaited futures and
turns the timing model into sleeps. A cancelled coroutine (the client went away) cancels its
ticket, which frees the slot or drops the queued request at once, as Ollama does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from parallama.alarm import Alarm
from parallama.core.kv_slots import CacheRule
from parallama.sim.scheduler import Admission, AdmissionState, OllamaScheduler, OllamaSettings
from parallama.sim.text import tokenize
from parallama.sim.timing import TimingModel


@dataclass
class Generation:
    """What one request cost, for the final chunk's statistics (seconds)."""

    load: float = 0.0
    prompt_eval: float = 0.0
    eval: float = 0.0
    cached: int = 0  # prompt tokens found in the slot's cache, not evaluated again


class Engine:
    """One emulated server's compute: scheduler, slots and token timing."""

    def __init__(
        self,
        settings: OllamaSettings,
        timing: TimingModel,
        slots_for: dict[str, int],
        *,
        clock: Callable[[], float] = time.monotonic,
        ram_tokens_for: dict[str, int] | None = None,
        cache_rule: CacheRule = "llama-server",
    ) -> None:
        """`clock`: time.monotonic, not loop.time (uvloop's ticks in whole milliseconds), but
        for the capacity planner's virtual one."""
        self._loop = asyncio.get_running_loop()
        self.timing = timing
        self.now = clock
        self.scheduler = OllamaScheduler(
            settings,
            clock=self.now,
            load_seconds=lambda _model: timing.load_seconds,
            slots_for=lambda model: slots_for.get(model, settings.num_parallel),
            ram_tokens_for=lambda model: (ram_tokens_for or {}).get(model, 0),
            cache_rule=cache_rule,
        )
        self._waiters: dict[Admission, asyncio.Future[None]] = {}
        # Per model, prompt tokens asked for and those found in a slot's cache (/_sim/state).
        self.prompt_tokens: Counter[str] = Counter()
        self.cached_tokens: Counter[str] = Counter()
        self._alarm = Alarm(self._on_alarm, clock)
        self._wall_offset = time.time() - self.now()

    def wall_time(self, loop_time: float) -> float:
        """Convert the scheduler's monotonic clock to Unix time (for `expires_at`)."""
        return loop_time + self._wall_offset

    @contextlib.asynccontextmanager
    async def admitted(
        self,
        model: str,
        *,
        keep_alive: float | None,
        num_ctx: int | None,
        needs_slot: bool = True,
    ) -> AsyncIterator[Admission]:
        """Hold a slot of `model` for the body of the `async with` (or raise ServerBusyError)."""
        ticket = self.scheduler.submit(
            model, keep_alive=keep_alive, num_ctx=num_ctx, needs_slot=needs_slot
        )
        done = False
        try:
            if ticket.state is not AdmissionState.RUNNING:
                future = self._loop.create_future()
                self._waiters[ticket] = future
                self._changed()
                await future
            yield ticket
            done = True
        finally:
            self._waiters.pop(ticket, None)
            if done:
                self.scheduler.finish(ticket)
            else:
                self.scheduler.cancel(ticket)
            self._changed()

    def unload(self, model: str) -> None:
        self.scheduler.unload(model)
        self._changed()

    async def generate(
        self,
        ticket: Admission,
        prompt: Sequence[str],
        tokens: Sequence[str],
        stats: Generation,
        *,
        cache: bool = True,
    ) -> AsyncIterator[str]:
        """Yield `tokens` at the pace of the timing model, after the prefill of the part of
        `prompt` (its tokens) that its slot does not hold already (all of it without `cache`,
        as for embeddings)."""
        now = self.now
        stats.load = (ticket.ready_at or ticket.arrived_at) - ticket.arrived_at
        slots = ticket.runner.cache if ticket.runner is not None and cache else None
        slot, shared = slots.take(prompt) if slots is not None else (-1, 0)
        stats.cached = min(shared, len(prompt) - 1) if prompt else 0  # the last is evaluated
        if cache:
            self.prompt_tokens[ticket.model] += len(prompt)
            self.cached_tokens[ticket.model] += stats.cached
        generated: list[str] = []
        try:
            start = now()
            busy = self.scheduler.busy_slots(ticket.model)
            evaluated = (
                self.timing.evaluated_tokens(len(prompt), stats.cached) if cache else len(prompt)
            )
            prefill = self.timing.prefill_seconds(evaluated, busy)
            await _sleep_until(now, start + prefill)
            stats.prompt_eval = now() - start
            decode_start = deadline = now()
            for token in tokens:
                deadline += self.timing.token_seconds(self.scheduler.busy_slots(ticket.model))
                await _sleep_until(now, deadline)
                generated.append(token)
                yield token
            stats.eval = now() - decode_start
        finally:
            if slots is not None:
                # As the next turn of a conversation will send the answer back.
                slots.give_back(slot, (*prompt, *tokenize("".join(generated))))

    async def prefill(self, ticket: Admission, prompt_tokens: int, stats: Generation) -> None:
        """Spend the time an embedding (prefill only, no prompt cache) takes."""
        async for _ in self.generate(ticket, ("",) * prompt_tokens, (), stats, cache=False):
            pass

    def _changed(self) -> None:
        """After any scheduler call: wake started tickets and re-arm the timer."""
        for ticket in self.scheduler.take_started():
            future = self._waiters.get(ticket)
            if future is not None and not future.done():
                future.set_result(None)
        self._alarm.set(self.scheduler.next_wakeup())

    def _on_alarm(self) -> None:
        self.scheduler.tick()
        self._changed()

    def close(self) -> None:
        self._alarm.cancel()


async def _sleep_until(now: Callable[[], float], deadline: float) -> None:
    delay = deadline - now()
    if delay > 0:
        await asyncio.sleep(delay)
