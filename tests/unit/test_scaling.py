"""What the autoscaling driver sees of a group, on a fake clock (no engine is started: the
instances' states are set as the supervisor would set them)."""

from __future__ import annotations

from parallama.core.backends import Backend
from parallama.core.scheduler import Scheduler, SchedulerSettings
from parallama.launch.engines import InstanceSettings, launch
from parallama.launch.scaling import Scaling
from parallama.launch.supervisor import Supervisor
from tests.clock import FakeClock
from tests.unit.schedulers import M


def group_of(name: str, count: int, first_port: int, **autoscale: float) -> list[InstanceSettings]:
    return [
        InstanceSettings.model_validate(
            {
                "engine": "sim",
                "name": name,
                "port": first_port,
                "autoscale": {"max": count, "cooldown": 0, **autoscale},
            }
        )
    ]


def fleet(clock: FakeClock, *tables: InstanceSettings) -> tuple[Supervisor, Scheduler, Scaling]:
    launches = [
        launch(table, i, table.port + k, member=k + 1)
        for i, table in enumerate(tables)
        for k in range(table.engines)
    ]
    supervisor = Supervisor(launches)
    scheduler = Scheduler(SchedulerSettings(), clock)
    for item in launches:
        scheduler.add_backend(Backend(item.url, slots=1))
    for instance in supervisor.instances:
        instance.state = "stopped"
    return supervisor, scheduler, Scaling(supervisor, scheduler, clock)


def states(supervisor: Supervisor) -> list[str]:
    return [instance.state for instance in supervisor.instances]


def serving(supervisor: Supervisor, scheduler: Scheduler, name: str) -> None:
    instance = next(i for i in supervisor.instances if i.name == name)
    instance.state = "ready"
    scheduler.set_online(instance.launch.url, True)


async def test_an_engine_is_idle_since_its_last_request_left_not_since_a_tick_saw_it() -> None:
    clock = FakeClock()
    supervisor, scheduler, scaling = fleet(clock, *group_of("g", 1, 9100, idle_after=3))
    serving(supervisor, scheduler, "g.1")
    scaling.tick()  # idle from now, as far as any tick can tell
    clock.now = 2.0
    ticket = scheduler.submit(M)  # a short request between two ticks
    clock.now = 2.05
    scheduler.release(ticket)
    clock.now = 3.5
    scaling.tick()
    assert states(supervisor) == ["ready"]  # idle for 1.45 s only
    clock.now = 5.1
    scaling.tick()
    assert states(supervisor) == ["stopping"]
    await scaling.stop()


async def test_a_request_stranded_from_zero_starts_one_engine_in_one_group_only() -> None:
    clock = FakeClock()
    first = group_of("g", 1, 9200)
    second = group_of("h", 1, 9300)
    supervisor, scheduler, scaling = fleet(clock, *first, *second)
    for backend in scheduler.backends.values():
        scheduler.set_online(backend.name, False)
        scheduler.set_standby(backend.name, True)
    scheduler.submit(M)
    # Started: the first group's engine; the second sees it starting and starts nothing.
    scaling.tick()
    assert states(supervisor) == ["starting", "stopped"]
    await scaling.stop()  # the start is cancelled before it spawns anything
    await supervisor.stop()
