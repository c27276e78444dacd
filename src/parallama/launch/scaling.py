"""Autoscaling in `parallama up`: every `TICK`, what the gateway sees of each autoscaled group
(its models' queue, its engines' work) goes to the group's `Autoscaler`, and its decisions are
carried out through the supervisor. Each decision is logged, counted in `/metrics`
(`parallama_autoscale_decisions_total`) and kept for the status page and the dashboard.

A group's models are those its engines offer (all, until one has told its list). An engine is
busy while it starts, restarts or has requests in flight, and idle since its last request left
(as the scheduler noted it) or since it became ready. A request is stranded when no backend
that serves its model, and no engine starting that offers it, is there: in any group, or
outside all of them. The groups are looked at in turn, so that a start decided for one covers
the others' stranded requests too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from parallama.core.scheduler import Scheduler
from parallama.launch.autoscale import Autoscaler, Decision, Seen
from parallama.launch.supervisor import Instance, LaunchError, Supervisor
from parallama.runtime import cancelled

log = logging.getLogger("parallama.autoscale")

TICK = 0.25  # seconds between two looks at the groups: a request from zero waits up to this more
KEPT_DECISIONS = 20  # per group, for the status page


@dataclass
class Group:
    """One autoscaled `[[instances]]` table: its engines and what was decided for them."""

    name: str
    members: list[Instance]
    scaler: Autoscaler
    decided: Counter[str] = field(default_factory=Counter)  # decisions per action
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT_DECISIONS))
    idle_since: dict[str, float] = field(default_factory=dict)  # per engine serving nothing
    failed_at: dict[str, float] = field(default_factory=dict)  # per engine, its last failed start

    @property
    def engines(self) -> list[Instance]:
        """Those running, on their way up, or on their way down (a stop takes a moment)."""
        return [i for i in self.members if i.state != "stopped"]

    def next_to_start(self) -> Instance:
        """A stopped engine: one that has not failed to start, else the one that failed
        longest ago (a port taken from one member must not hold up the group)."""
        stopped = [i for i in self.members if i.state == "stopped"]
        return min(stopped, key=lambda i: self.failed_at.get(i.name, -math.inf))

    def status(self) -> dict[str, Any]:
        policy = self.scaler.policy
        return {
            "group": self.name,
            "min": policy.min,
            "max": policy.max,
            "engines": len(self.engines),
            "instances": [i.name for i in self.members],
            "decisions": list(self.recent),
        }


class Scaling:
    def __init__(
        self,
        supervisor: Supervisor,
        scheduler: Scheduler,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._supervisor = supervisor
        self._scheduler = scheduler
        self._clock = clock
        self.groups: dict[str, Group] = {}
        for instance in supervisor.instances:
            policy = instance.launch.autoscale
            if policy is not None:
                group = self.groups.get(instance.launch.group)
                if group is None:
                    group = Group(instance.launch.group, [], Autoscaler(policy))
                    self.groups[group.name] = group
                group.members.append(instance)
        self._task: asyncio.Task[None] | None = None
        self._starts: set[asyncio.Task[None]] = set()  # starts under way, awaited for the outcome

    def start(self) -> None:
        if self.groups:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """No more decisions (the supervisor's own stop cancels the starts under way)."""
        await cancelled(self._task)
        for task in list(self._starts):
            task.cancel()
        await asyncio.gather(*self._starts, return_exceptions=True)

    def status(self) -> list[dict[str, Any]]:
        return [group.status() for group in self.groups.values()]

    def collector(self) -> Collector:
        return _ScalingCollector(self)

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad tick must not end autoscaling for good
                log.exception("autoscaling tick failed")
            await asyncio.sleep(TICK)

    def tick(self) -> None:
        now = self._clock()
        waits = self._scheduler.oldest_waits(now)
        for group in self.groups.values():
            decision = group.scaler.decide(self._seen(group, waits, now), now)
            if decision is not None:
                self._carry_out(group, decision)

    def _seen(self, group: Group, waits: dict[str, float], now: float) -> Seen:
        backends = self._scheduler.backends
        mine = [backends[i.launch.url] for i in group.members if i.launch.url in backends]
        models = [m for m in waits if any(b.offers(m) for b in mine)]
        starting = {
            i.launch.url
            for i in self._supervisor.instances
            if i.state in ("starting", "restarting")
        }
        stranded = [
            m
            for m in models
            if not any(
                b.serves(m) or (b.name in starting and b.offers(m)) for b in backends.values()
            )
        ]
        idle_since: dict[str, float | None] = {}
        for instance in group.engines:
            backend = backends.get(instance.launch.url)
            if instance.state == "ready" and backend is not None and not backend.active:
                ready = group.idle_since.setdefault(instance.name, now)
                idle_since[instance.name] = max(ready, backend.last_release)
            else:
                idle_since[instance.name] = None
                group.idle_since.pop(instance.name, None)
        return Seen(
            oldest_wait=max((waits[m] for m in models), default=0.0),
            queued=sum(self._scheduler.queue_depth(m) for m in models),
            idle_since=idle_since,
            starting=sum(i.state in ("starting", "restarting") for i in group.members),
            stranded=sum(self._scheduler.queue_depth(m) for m in stranded),
        )

    def _carry_out(self, group: Group, decision: Decision) -> None:
        if decision.action == "start":
            instance = group.next_to_start()
            starting = self._supervisor.start_instance(instance)
            follow = asyncio.get_running_loop().create_task(
                self._started(group, instance, starting)
            )
            self._starts.add(follow)
            follow.add_done_callback(self._starts.discard)
        else:
            instance = next(i for i in group.members if i.name == decision.instance)
            group.idle_since.pop(instance.name, None)
            self._supervisor.stop_instance(instance)
        group.decided[decision.action] += 1
        group.recent.append(
            {
                "time": time.time(),
                "action": decision.action,
                "instance": instance.name,
                "reason": decision.reason,
            }
        )
        fields = {"group": group.name, "action": decision.action, "instance": instance.name}
        log.info("autoscaling", extra={"fields": fields | {"reason": decision.reason}})

    async def _started(
        self, group: Group, instance: Instance, starting: asyncio.Task[None]
    ) -> None:
        """The start's outcome, for the group's hold after failures."""
        try:
            await starting
        except LaunchError as exc:
            group.failed_at[instance.name] = now = self._clock()
            group.scaler.start_failed(now)
            fields = {"group": group.name, "instance": instance.name, "error": str(exc)}
            log.error("autoscaling start failed", extra={"fields": fields})
        else:
            group.failed_at.pop(instance.name, None)
            group.scaler.start_succeeded()


class _ScalingCollector(Collector):
    """The groups for Prometheus, read at scrape time."""

    def __init__(self, scaling: Scaling) -> None:
        self._scaling = scaling

    def collect(self) -> Iterator[Metric]:
        engines = GaugeMetricFamily(
            "parallama_autoscale_engines",
            "Engines of an autoscaled group not stopped: starting, serving or stopping",
            labels=["group"],
        )
        bounds = GaugeMetricFamily(
            "parallama_autoscale_limit",
            "An autoscaled group's min and max engines",
            labels=["group", "limit"],
        )
        decisions = CounterMetricFamily(
            "parallama_autoscale_decisions",
            "Decisions to start or stop an engine of an autoscaled group",
            labels=["group", "action"],
        )
        for group in self._scaling.groups.values():
            engines.add_metric([group.name], len(group.engines))
            bounds.add_metric([group.name, "min"], group.scaler.policy.min)
            bounds.add_metric([group.name, "max"], group.scaler.policy.max)
            for action in ("start", "stop"):
                decisions.add_metric([group.name, action], group.decided[action])
        yield engines
        yield bounds
        yield decisions
