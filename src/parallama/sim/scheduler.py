"""Ollama's request scheduler, as a sans-I/O state machine with an injected clock.

This mirrors `server/sched.go` where concurrency is concerned:

- A request first waits in one bounded FIFO *pending* queue (`OLLAMA_MAX_QUEUE`). The scheduler
  takes the head, finds or loads a runner for its model, and only then takes the next one: while
  a model loads, or while a runner drains to make room, everything behind the head waits
  (head-of-line blocking). A full pending queue is "server busy" (HTTP 503).
- Once handed to a runner, a request waits on that runner's `num_parallel` slots. That wait is
  unbounded, as in Ollama (issue #7758): a warm burst queues, a cold burst can be rejected.
- At most `max_loaded_models` runners. To make room Ollama unloads the first idle runner in
  (keep-alive ascending, model name) order, else drains the first one; `lru` is offered as the
  variant users often assume.
- A runner whose request options differ (here: `num_ctx`) is drained and reloaded.
- An idle runner unloads `keep_alive` seconds after its last request finished (0: at once,
  infinity: never).

Nothing here sleeps or does I/O. The driver calls `submit`, `cancel`, `finish` and `tick`, then
collects the tickets that may proceed with `take_started()`, and arranges to call `tick` again at
`next_wakeup()`.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from parallama.core.kv_slots import CacheRule, EngineSlots
from parallama.sim.prompt_cache import common_prefix

Clock = Callable[[], float]
EvictionPolicy = Literal["ollama", "lru"]


class ServerBusyError(Exception):
    """The pending queue is full (Ollama's `ErrMaxQueue`)."""


class AdmissionState(enum.Enum):
    PENDING = "pending"  # in the bounded pending queue
    SCHEDULED = "scheduled"  # attached to a runner, waiting for it to load or for a slot
    RUNNING = "running"  # holds a slot (or, for a preload, the runner is ready)
    DONE = "done"
    CANCELLED = "cancelled"


class RunnerState(enum.Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass(eq=False)
class Admission:
    """One request's passage through the scheduler."""

    model: str
    keep_alive: float
    num_ctx: int
    arrived_at: float
    needs_slot: bool = True
    state: AdmissionState = AdmissionState.PENDING
    runner: Runner | None = None
    ready_at: float | None = None  # runner loaded and request attached: ends `load_duration`
    started_at: float | None = None  # slot acquired


@dataclass(eq=False)
class Runner:
    """A loaded (or loading) model with its parallel slots."""

    model: str
    num_ctx: int
    slots: int
    keep_alive: float
    state: RunnerState
    loaded_at: float
    last_used: float
    draining: bool = False  # chosen for unload: takes no new requests, unloads when idle
    expires_at: float | None = None  # set while idle; None while busy or kept forever
    running: list[Admission] = field(default_factory=list)
    waiting: deque[Admission] = field(default_factory=deque)
    ram_tokens: int = 0  # what its engine's host-RAM prompt cache holds, in tokens (llama.cpp)
    cache_rule: CacheRule = "llama-server"  # which slot a request takes, by the prompt it shares
    cache: EngineSlots[Sequence[str]] = field(init=False)  # its prompt cache: lost on unload

    def __post_init__(self) -> None:
        self.cache = EngineSlots(self.slots, common_prefix, self.cache_rule, self.ram_tokens)

    @property
    def busy_slots(self) -> int:
        return sum(1 for t in self.running if t.needs_slot)

    @property
    def refcount(self) -> int:
        return len(self.running) + len(self.waiting)


@dataclass(frozen=True)
class OllamaSettings:
    num_parallel: int = 1
    max_queue: int = 512
    max_loaded_models: int = 3
    default_keep_alive: float = 300.0
    default_num_ctx: int = 4096
    eviction: EvictionPolicy = "ollama"


class OllamaScheduler:
    """Pending queue, runners, slots and keep-alive timers of one emulated Ollama server."""

    def __init__(
        self,
        settings: OllamaSettings,
        clock: Clock,
        load_seconds: Callable[[str], float],
        *,
        slots_for: Callable[[str], int] | None = None,
        ram_tokens_for: Callable[[str], int] | None = None,
        cache_rule: CacheRule = "llama-server",
    ) -> None:
        self.settings = settings
        self._cache_rule = cache_rule
        self._clock = clock
        self._load_seconds = load_seconds
        self._slots_for = slots_for or (lambda _model: settings.num_parallel)
        self._ram_tokens_for = ram_tokens_for or (lambda _model: 0)
        self.pending: deque[Admission] = deque()
        self.runners: dict[str, Runner] = {}
        self._load_done_at: float | None = None  # the one load in progress
        self._started: list[Admission] = []
        self.unloads = 0  # runners unloaded so far (observability)
        self.loads: Counter[str] = Counter()  # loads begun so far, per model (reloads too)

    # -- requests -------------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        *,
        keep_alive: float | None = None,
        num_ctx: int | None = None,
        needs_slot: bool = True,
    ) -> Admission:
        """Queue a request; raises `ServerBusyError` when the pending queue is full."""
        if len(self.pending) >= self.settings.max_queue:
            raise ServerBusyError
        ticket = Admission(
            model=model,
            keep_alive=self.settings.default_keep_alive if keep_alive is None else keep_alive,
            num_ctx=num_ctx or self.settings.default_num_ctx,
            arrived_at=self._clock(),
            needs_slot=needs_slot,
        )
        self.pending.append(ticket)
        self._pump()
        return ticket

    def cancel(self, ticket: Admission) -> None:
        """The client went away: drop the request wherever it is and free what it held."""
        if ticket.state is AdmissionState.PENDING:
            self.pending.remove(ticket)
        elif ticket.state in (AdmissionState.SCHEDULED, AdmissionState.RUNNING):
            self._detach(ticket)
        else:
            return
        ticket.state = AdmissionState.CANCELLED
        self._pump()

    def finish(self, ticket: Admission) -> None:
        """The request completed: free its slot."""
        if ticket.state is not AdmissionState.RUNNING:
            return
        self._detach(ticket)
        ticket.state = AdmissionState.DONE
        self._pump()

    def unload(self, model: str) -> None:
        """`keep_alive: 0` with an empty prompt: unload now, or as soon as the runner is idle."""
        runner = self.runners.get(model)
        if runner is None:
            return
        runner.keep_alive = 0.0
        if runner.refcount == 0:
            self._went_idle(runner)
        self._pump()

    def tick(self) -> None:
        """Let time-based events happen: loads completing, keep-alive timers expiring."""
        self._pump()

    def take_started(self) -> list[Admission]:
        """Tickets that reached RUNNING since the last call."""
        started, self._started = self._started, []
        return started

    def next_wakeup(self) -> float | None:
        """The earliest time at which `tick` has something to do."""
        times = [r.expires_at for r in self.runners.values() if r.expires_at is not None]
        if self._load_done_at is not None:
            times.append(self._load_done_at)
        return min(times, default=None)

    # -- observability --------------------------------------------------------------------------

    def busy_slots(self, model: str) -> int:
        runner = self.runners.get(model)
        return runner.busy_slots if runner else 0

    def loaded(self) -> list[Runner]:
        return list(self.runners.values())

    # -- the machine ----------------------------------------------------------------------------

    def _detach(self, ticket: Admission) -> None:
        runner = ticket.runner
        assert runner is not None
        if ticket in runner.running:
            runner.running.remove(ticket)
        else:
            runner.waiting.remove(ticket)
        runner.last_used = self._clock()
        if runner.refcount == 0:
            self._went_idle(runner)

    def _went_idle(self, runner: Runner) -> None:
        if runner.state is RunnerState.LOADING:
            return  # the load itself still completes, as in Ollama
        now = self._clock()
        if runner.draining or runner.keep_alive == 0:
            self._unload(runner)
        elif math.isinf(runner.keep_alive):
            runner.expires_at = None
        else:
            runner.expires_at = now + runner.keep_alive

    def _unload(self, runner: Runner) -> None:
        del self.runners[runner.model]
        self.unloads += 1

    def _pump(self) -> None:
        now = self._clock()
        self._finish_load(now)
        self._expire_idle(now)
        while self.pending and self._load_done_at is None:
            if not self._schedule_head(now):
                break  # head-of-line: the head waits for a drain
        for runner in self.runners.values():
            self._fill_slots(runner, now)

    def _finish_load(self, now: float) -> None:
        if self._load_done_at is None or now < self._load_done_at:
            return
        self._load_done_at = None
        for runner in self.runners.values():
            if runner.state is RunnerState.LOADING:
                runner.state = RunnerState.READY
                runner.loaded_at = now
                for ticket in runner.waiting:
                    ticket.ready_at = now
                if runner.refcount == 0:
                    self._went_idle(runner)

    def _expire_idle(self, now: float) -> None:
        for runner in list(self.runners.values()):
            if runner.refcount == 0 and runner.expires_at is not None and runner.expires_at <= now:
                self._unload(runner)

    def _schedule_head(self, now: float) -> bool:
        """Place the head of the pending queue. False when it must wait for a runner to drain."""
        ticket = self.pending[0]
        runner = self.runners.get(ticket.model)
        if runner is not None and not runner.draining and runner.num_ctx == ticket.num_ctx:
            self.pending.popleft()
            self._attach(ticket, runner, now)
            return True
        if runner is not None:
            victim = runner  # needs a reload with other options
        elif len(self.runners) >= self.settings.max_loaded_models:
            victim = self._choose_victim()
        else:
            self.pending.popleft()
            self._start_load(ticket, now)
            return True
        if victim.refcount == 0:
            self._unload(victim)
            return True  # room made; place the head on the next turn of the loop
        victim.draining = True
        victim.expires_at = None
        return False

    def _choose_victim(self) -> Runner:
        runners = list(self.runners.values())
        if self.settings.eviction == "lru":
            runners.sort(key=lambda r: r.last_used)
        else:
            runners.sort(key=lambda r: (r.keep_alive, r.model))
        idle = [r for r in runners if r.refcount == 0]
        return idle[0] if idle else runners[0]

    def _start_load(self, ticket: Admission, now: float) -> None:
        runner = Runner(
            model=ticket.model,
            num_ctx=ticket.num_ctx,
            slots=self._slots_for(ticket.model),
            ram_tokens=self._ram_tokens_for(ticket.model),
            cache_rule=self._cache_rule,
            keep_alive=ticket.keep_alive,
            state=RunnerState.LOADING,
            loaded_at=now,
            last_used=now,
        )
        self.runners[ticket.model] = runner
        self.loads[ticket.model] += 1
        self._load_done_at = now + self._load_seconds(ticket.model)
        self._attach(ticket, runner, now)
        self._finish_load(now)  # a zero-second load is ready at once

    def _attach(self, ticket: Admission, runner: Runner, now: float) -> None:
        ticket.state = AdmissionState.SCHEDULED
        ticket.runner = runner
        runner.keep_alive = ticket.keep_alive
        runner.expires_at = None
        runner.last_used = now
        if runner.state is RunnerState.READY:
            ticket.ready_at = now
        runner.waiting.append(ticket)

    def _fill_slots(self, runner: Runner, now: float) -> None:
        if runner.state is not RunnerState.READY:
            return
        kept: deque[Admission] = deque()
        while runner.waiting:
            ticket = runner.waiting.popleft()
            if ticket.needs_slot and runner.busy_slots >= runner.slots:
                kept.append(ticket)
                kept.extend(runner.waiting)
                runner.waiting.clear()
                break
            ticket.state = AdmissionState.RUNNING
            ticket.started_at = now
            runner.running.append(ticket)
            self._started.append(ticket)
        runner.waiting = kept


def runner_rows(runners: Iterable[Runner]) -> list[Runner]:
    """Runners in `/api/ps` order: latest expiry first (busy and kept-forever ones on top)."""
    return sorted(runners, key=lambda r: -(r.expires_at if r.expires_at is not None else math.inf))
