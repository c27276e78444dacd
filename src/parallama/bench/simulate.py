"""Capacity planning without waiting: the benchmark's workload against N emulated servers behind
the gateway's scheduler, on a virtual clock.

Nothing here is a model of the real thing: the requests go through the gateway's own scheduler
(queues, late binding, routing) and the emulator's own engine (Ollama's slots, queue, model
loading, and timing by hardware profile), the very code `parallama serve` and `parallama sim`
run, only without sockets and on an event loop whose clock jumps to the next timer instead of
waiting for it. An hour of load takes seconds, and comes out the same every time.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from parallama.bench.runner import Plan, Result, Runner, Setup
from parallama.bench.sessions import Conversation
from parallama.bench.stats import Sample
from parallama.config import GatewaySettings
from parallama.core.backends import Backend
from parallama.core.breaker import Breaker
from parallama.core.exchange import Exchange
from parallama.core.lifecycle import Lifecycle
from parallama.core.placement import Warm, loads_wanted
from parallama.core.router import Policy
from parallama.core.scheduler import Scheduler, SchedulerSettings
from parallama.errors import ApiError
from parallama.gateway.waiting import Waiting
from parallama.sim.answers import chat_prompt, generate_prompt, plan_answer
from parallama.sim.config import SimConfig
from parallama.sim.engine import Engine, Generation
from parallama.sim.scheduler import ServerBusyError

T = TypeVar("T")
RETRIES: int = GatewaySettings.model_fields["retries"].default  # as `parallama serve` has it


class _Skip(selectors.BaseSelector):
    """A selector with nothing to watch: asked to wait, it moves the clock on instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, id(fileobj), events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("the simulation is stuck: nothing is scheduled and all wait")
        self._loop.now += max(timeout, 0.0)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` is virtual: it runs every ready callback, then jumps to the
    next timer. Only for code that does no I/O."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_Skip(self))

    def time(self) -> float:
        return self.now


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


class SimulatedFleet:
    """`instances` emulated Ollama servers behind the gateway's scheduler, in one process."""

    def __init__(
        self,
        plan: Plan,
        sim: SimConfig,
        instances: int,
        routing: Policy,
        queue_timeout: float,
        *,
        retries: int = RETRIES,
        warm: bool = False,
    ) -> None:
        """`warm`: every model kept loaded on every engine (the gateway's `warm = true` with a
        pinned `keep_alive = -1`); else engines start empty and each request asks Ollama's
        default keep-alive."""
        loop = asyncio.get_running_loop()
        self._plan = plan
        self._sim = sim
        self._retries = retries
        self._keep_alive = math.inf if warm else None
        self._clock = loop.time
        slots = {m.name: 1 for m in sim.models if m.is_embedding}  # as Ollama forces
        self._engines = {
            f"sim-{i}": Engine(sim.scheduler, sim.timing, slots, clock=loop.time)
            for i in range(instances)
        }
        self.scheduler = Scheduler(
            SchedulerSettings(routing=routing, queue_timeout=queue_timeout), loop.time
        )
        room = sim.scheduler.max_loaded_models or None  # told, as `parallama up` tells it
        for name in self._engines:
            self.scheduler.add_backend(
                Backend(name, slots=sim.scheduler.num_parallel, room=room, breaker=Breaker())
            )
        self._waiting = Waiting(self.scheduler, loop.time)

    async def warm(self) -> None:
        """Load every model where the gateway's warm placement puts it (all engines), before
        the first request; kept for ever."""
        models = [m.name for m in self._sim.models]
        loads = loads_wanted([Warm(m, None) for m in models], self.scheduler.backends, set())

        async def load(name: str, model: str) -> None:
            engine = self._engines[name]
            async with engine.admitted(model, keep_alive=math.inf, num_ctx=None, needs_slot=False):
                pass
            self._seen(name)

        await asyncio.gather(*(load(name, model) for name, model in loads))

    def _seen(self, name: str) -> None:
        """What the gateway's probes would find loaded on the engine."""
        self.scheduler.set_loaded(name, self._engines[name].scheduler.runners)

    async def send(
        self, setup: Setup, n: int, sample: Sample, conversation: Conversation | None = None
    ) -> None:
        """The n-th request through the gateway's queue to an engine, as `parallama serve`
        would send it: every decision (admission, "server busy" throttled and moved to another
        engine while one is left, the outcome) is the gateway's own `Lifecycle`'s."""
        workload = self._plan.workload
        traced = workload.trace[n] if workload.trace else None
        model = traced.model if traced else workload.model
        client = traced.key if traced and traced.key else "bench"  # fair shares are per key
        exchange = Exchange("POST", "/api/generate", "bench", self._clock())
        life = Lifecycle(self.scheduler, exchange, self._retries, self._waiting.changed)
        sent = self._clock()
        try:
            life.admit(model, model, client=client)
            while True:
                if life.waiting:
                    await self._waiting.until_bound(life.ticket)
                sample.queue_wait = life.ticket.queue_seconds(self._clock())
                name = life.attempt()
                engine = self._engines[name]
                try:
                    await self._generate(engine, sample, n, sent)
                    self._seen(name)
                except ServerBusyError:
                    if (elsewhere := life.answered(503)) is None:
                        life.ended(503)
                        sample.error = "503"
                        return
                    if (given_up := life.failed(elsewhere)) is not None:
                        sample.error = str(given_up.status)
                        return
                    continue
                life.ended(200)
                return
        except ApiError as refused:  # turned away, or timed out in the queue
            sample.error = str(refused.status)
        finally:
            life.close(self._clock())  # the run may have ended it early

    def _tokens(self, n: int) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """The n-th request's model, prompt tokens and answer tokens: a traced request's
        lengths (its prompt its own, shared with no other), or the workload's prompts and
        the emulator's answers to them."""
        workload = self._plan.workload
        if workload.trace:
            traced = workload.trace[n]
            prompt_ids = tuple(f"{n}.{i}" for i in range(traced.prompt_tokens))
            return traced.model, prompt_ids, ("x",) * traced.generated_tokens
        text = workload.prompts[n % len(workload.prompts)]
        if workload.kind == "chat":
            prompt, prompt_ids = chat_prompt([{"role": "user", "content": text}])
        else:
            prompt, prompt_ids = generate_prompt(text, "", [], raw=False)
        answer = plan_answer(
            model=workload.model,
            prompt=prompt,
            num_predict=workload.max_tokens,
            request_seed=None,
            server_seed=self._sim.seed,
            length_range=self._sim.output_tokens,
        )
        return workload.model, tuple(prompt_ids), tuple(answer.tokens)

    async def _generate(self, engine: Engine, sample: Sample, n: int, sent: float) -> None:
        model, prompt_ids, answer = self._tokens(n)
        async with engine.admitted(model, keep_alive=self._keep_alive, num_ctx=None) as ticket:
            async for _ in engine.generate(ticket, prompt_ids, answer, Generation()):
                at = self._clock() - sent
                if sample.first_token is None:
                    sample.first_token = at
                sample.token_times.append(at)
        sample.prompt_tokens = len(prompt_ids)
        sample.output_tokens = len(answer)


async def _simulate(
    plan: Plan,
    sim: SimConfig,
    fleets: Mapping[str, int],
    *,
    routing: Policy,
    queue_timeout: float,
    warm: bool,
) -> Result:
    loop = asyncio.get_running_loop()
    by_setup = {
        label: SimulatedFleet(plan, sim, count, routing, queue_timeout, warm=warm)
        for label, count in fleets.items()
    }
    if warm:
        await asyncio.gather(*(fleet.warm() for fleet in by_setup.values()))

    async def send(
        setup: Setup, n: int, sample: Sample, conversation: Conversation | None = None
    ) -> None:
        await by_setup[setup.label].send(setup, n, sample, conversation)

    return await Runner(plan, send, clock=loop.time).run()


def simulate(
    plan: Plan,
    sim: SimConfig,
    fleets: Mapping[str, int],
    *,
    routing: Policy = "least-loaded",
    queue_timeout: float = 60.0,
    warm: bool = False,
) -> Result:
    """Run `plan` against simulated fleets: setup label -> instances of the `sim` server."""
    return run_virtual(
        _simulate(plan, sim, fleets, routing=routing, queue_timeout=queue_timeout, warm=warm)
    )
