"""Engine processes kept running: started, waited on until they serve, their output written to
their own log files, restarted with backoff when they die, and stopped (with whatever they
started) when parallama stops.

Each engine runs in a session of its own, so Ctrl-C at the terminal reaches parallama alone and
the engines are stopped in order: SIGTERM to the engine's whole process group (`ollama serve`
starts a runner process per model), then SIGKILL if it has not exited after a grace period.

An engine is ready only while its own process serves: its port must be free before it starts
(else another server would answer in its place while the engine, unable to listen, exits), and
the server that answers its ready path must be its process or one of its session's. Each state
change is told to `on_state`, which takes the instance in and out of the gateway's routing.

Of an autoscaled group, only its `min` engines start with parallama; `start_instance` and
`stop_instance` start and stop the others as the autoscaling decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from parallama.errors import ParallamaError
from parallama.gateway.http.upstream import Upstream
from parallama.launch import ports
from parallama.launch.engines import Launch
from parallama.launch.output import EngineOutput

log = logging.getLogger("parallama.launch")

State = Literal["starting", "ready", "restarting", "stopping", "stopped"]
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_SECONDS = 60.0  # up this long, a crash counts as the first again
LOOK_EVERY = 0.2  # seconds between readiness checks of a starting engine


class LaunchError(ParallamaError):
    """An engine could not be started; the message names it and quotes its last words."""


def free_port(host: str) -> int:
    """A port nobody listens on now, for an instance configured with port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class Instance:
    """One engine process and what is known of it."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.state: State = "starting"
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error: str | None = None  # why the last restart failed, until it serves
        self.started_at = 0.0
        self.output = EngineOutput(launch.name, launch.log_file)
        self._forwarding: asyncio.Task[None] | None = None
        self._creating: asyncio.Future[asyncio.subprocess.Process] | None = None

    @property
    def name(self) -> str:
        return self.launch.name

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.launch.url,
            "dialect": self.launch.dialect,
            "state": self.state,
            "pid": self.pid if self.state != "stopped" else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "log": None if self.launch.log_file is None else str(self.launch.log_file),
        }


class InstanceCollector(Collector):
    """The instances for Prometheus, read at scrape time: up or not, and restarts so far."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "parallama_instance_up", "1 while an engine process serves", labels=["instance"]
        )
        restarts = CounterMetricFamily(
            "parallama_instance_restarts",
            "Times an engine process was restarted",
            labels=["instance"],
        )
        for instance in self._supervisor.instances:
            up.add_metric([instance.name], 1 if instance.state == "ready" else 0)
            restarts.add_metric([instance.name], instance.restarts)
        yield up
        yield restarts


class Supervisor:
    def __init__(
        self, launches: list[Launch], on_state: Callable[[Instance], None] | None = None
    ) -> None:
        """`on_state` is told each time an instance changes state: `parallama up` routes to it
        only while it is ready."""
        self.instances = [Instance(launch) for launch in launches]
        self.on_state = on_state
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._work: set[asyncio.Task[None]] = set()  # starts and stops of single instances

    def status(self) -> list[dict[str, Any]]:
        return [instance.status() for instance in self.instances]

    async def start(self) -> None:
        """Start every instance (of an autoscaled group, its first `min`) and return once all
        serve; if one cannot, stop them all and raise `LaunchError`."""
        first = _first_engines(self.instances)
        for instance in self.instances:
            if instance not in first:
                instance.state = "stopped"
        starting = [asyncio.ensure_future(self._start(i)) for i in first]
        try:
            await asyncio.gather(*starting)
        except BaseException:
            for task in starting:  # the others, mid-start: each stops where it is
                task.cancel()
            await asyncio.gather(*starting, return_exceptions=True)
            await self.stop()
            raise
        for instance in first:
            self._follow(instance)

    def start_instance(self, instance: Instance) -> asyncio.Task[None]:
        """Start a stopped instance: "starting" at once, and the task returned ends once it
        serves, or with `LaunchError` (stopped again) if it cannot."""
        self._enter(instance, "starting")
        return self._task(self._start_stopped(instance))

    def stop_instance(self, instance: Instance) -> asyncio.Task[None]:
        """Stop one engine and keep it stopped: out of the gateway's routing at once, before any
        other request can be sent to it; the task returned ends once it has exited."""
        self._enter(instance, "stopping")
        return self._task(self._stop_one(instance))

    def _task(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A start or stop of one instance, cancelled if parallama stops first."""
        task = asyncio.get_running_loop().create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    async def _start_stopped(self, instance: Instance) -> None:
        try:
            await self._start(instance)
        except Exception as exc:  # not only LaunchError: it must not stay "starting"
            instance.last_error = str(exc) or repr(exc)
            self._enter(instance, "stopped")
            if isinstance(exc, LaunchError):
                raise
            raise LaunchError(f"instance {instance.name}: {instance.last_error}") from exc
        self._follow(instance)

    async def _stop_one(self, instance: Instance) -> None:
        watcher = self._watchers.pop(instance.name, None)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await self._terminate(instance)
        self._enter(instance, "stopped")

    def _follow(self, instance: Instance) -> None:
        """Restart the instance whenever it exits, from now on."""
        task = asyncio.get_running_loop().create_task(self._watch(instance))
        self._watchers[instance.name] = task

    async def stop(self) -> None:
        tasks = [*self._work, *self._watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._terminate(i) for i in self.instances))
        for instance in self.instances:
            self._enter(instance, "stopped")
            instance.output.close()

    def _enter(self, instance: Instance, state: State) -> None:
        if state != instance.state:
            instance.state = state
            if self.on_state is not None:
                self.on_state(instance)

    # -- one instance ---------------------------------------------------------------------------

    async def _start(self, instance: Instance) -> None:
        await self._spawn(instance)
        try:
            await self._until_ready(instance)
        except LaunchError:
            await self._terminate(instance)
            raise
        instance.last_error = None
        self._enter(instance, "ready")
        log.info(
            "instance ready",
            extra={"fields": {"instance": instance.name, "url": instance.launch.url}},
        )

    async def _spawn(self, instance: Instance) -> None:
        launch = instance.launch
        await _claim_port(launch)
        try:
            instance.output.open()
        except OSError as exc:
            raise LaunchError(
                f"instance {launch.name}: cannot write its log file {launch.log_file}: "
                f"{exc.strerror}"
            ) from None
        # Shielded: a start cancelled while the process is being created must still leave its
        # handle for `_terminate`, or the process would outlive parallama in its own session.
        instance._creating = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=os.environ | launch.env,
                start_new_session=True,
            )
        )
        try:
            process = await asyncio.shield(instance._creating)
        except OSError as exc:
            raise LaunchError(
                f"instance {launch.name}: cannot run {launch.argv[0]!r}: {exc.strerror}"
            ) from None
        instance.process = process
        instance.started_at = time.monotonic()
        instance.output.begin(process.pid)
        assert process.stdout is not None
        instance._forwarding = asyncio.get_running_loop().create_task(
            instance.output.read(process.stdout)
        )
        self._enter(instance, "starting")
        fields = {"instance": launch.name, "pid": process.pid, "url": launch.url}
        log.info("instance started", extra={"fields": fields | {"log": instance.status()["log"]}})

    async def _until_ready(self, instance: Instance) -> None:
        """Ask the engine its ready path until it answers 200 from its own process, it exits,
        or time runs out."""
        launch, process = instance.launch, instance.process
        assert process is not None
        exited = asyncio.ensure_future(process.wait())
        upstream = Upstream(launch.url, connect_timeout=1.0, read_timeout=5.0)
        stranger = ""  # who answered in the engine's place, if anyone
        try:
            async with asyncio.timeout(launch.ready_timeout):
                while True:
                    if (await upstream.get(launch.ready_path, 5.0))[0] == 200:
                        stranger = await _stranger_answering(launch, process)
                        if not stranger:
                            return
                    await asyncio.wait({exited}, timeout=LOOK_EVERY)
                    if exited.done():
                        await _ended(instance, describe_exit(exited.result()))
                        raise LaunchError(_exited_early(instance, exited.result(), stranger))
        except TimeoutError:
            raise LaunchError(_too_slow(instance, stranger)) from None
        finally:
            exited.cancel()
            await upstream.close()

    async def _watch(self, instance: Instance) -> None:
        """Restart the instance whenever it exits: at once after a long run, else after a
        backoff that doubles with each quick failure in a row (to start or to keep running)."""
        quick_failures = 0
        while True:
            assert instance.process is not None
            code = await instance.process.wait()
            instance.last_exit = code
            self._enter(instance, "restarting")  # out of the gateway's routing at once
            ran = time.monotonic() - instance.started_at
            quick_failures = 0 if ran >= STABLE_SECONDS else quick_failures + 1
            fields = {"instance": instance.name, "code": code, "signal": _signal_name(code)}
            fields["restart_in"] = _backoff(quick_failures)
            log.warning("instance exited", extra={"fields": fields})
            _kill_group(instance.process.pid, signal.SIGKILL)  # what it started, if still there
            await _ended(instance, describe_exit(code))
            quick_failures = await self._restart(instance, quick_failures)

    async def _restart(self, instance: Instance, quick_failures: int) -> int:
        """Start the instance again, after the backoff, until it serves; the quick failures in
        a row then."""
        while True:
            await asyncio.sleep(_backoff(quick_failures))
            instance.restarts += 1
            try:
                await self._start(instance)
            except LaunchError as exc:
                quick_failures += 1
                instance.last_error = str(exc)
                self._enter(instance, "restarting")
                delay = _backoff(quick_failures)
                fields = {"instance": instance.name, "error": str(exc), "restart_in": delay}
                log.error("restart failed", extra={"fields": fields})
            else:
                return quick_failures

    async def _terminate(self, instance: Instance) -> None:
        creating = instance._creating
        if creating is not None and (instance.process is None or not creating.done()):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                instance.process = await creating  # created after its start was cancelled
        process = instance.process
        if process is not None and process.returncode is None:
            _kill_group(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await process.wait()
            except TimeoutError:
                log.warning("instance killed", extra={"fields": {"instance": instance.name}})
            _kill_group(process.pid, signal.SIGKILL)
            code = await process.wait()
            await _ended(instance, f"stopped by parallama, {describe_exit(code)}")
            log.info(
                "instance stopped", extra={"fields": {"instance": instance.name, "code": code}}
            )
        await _drained(instance)


def _first_engines(instances: list[Instance]) -> list[Instance]:
    """The instances that start with parallama: all, but of an autoscaled group its `min`."""
    taken: dict[str, int] = {}
    first = []
    for instance in instances:
        policy, group = instance.launch.autoscale, instance.launch.group
        if policy is None or taken.get(group, 0) < policy.min:
            taken[group] = taken.get(group, 0) + 1
            first.append(instance)
    return first


def describe_exit(code: int) -> str:
    """An exit status as people say it: `code 3`, or `signal SIGSEGV (exit -11)`."""
    return f"code {code}" if code >= 0 else f"signal {_signal_name(code)} (exit {code})"


def _signal_name(code: int) -> str | None:
    """The signal that ended a process (asyncio's negative exit status), by name."""
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return str(-code)


def _backoff(quick_failures: int) -> float:
    """Seconds before a restart: none after a long run, then 1, 2, 4 ... up to 30."""
    if not quick_failures:
        return 0.0
    return min(FIRST_BACKOFF * 2.0 ** (quick_failures - 1), MAX_BACKOFF)


async def _claim_port(launch: Launch) -> None:
    """`LaunchError` if a server already listens on the instance's port, naming it."""
    if await asyncio.to_thread(ports.in_use, launch.host, launch.port):
        holder = await asyncio.to_thread(ports.holder, launch.host, launch.port)
        raise LaunchError(
            f"instance {launch.name}: port {launch.port} on {launch.host} is in use, by {holder}"
        )


async def _stranger_answering(launch: Launch, process: asyncio.subprocess.Process) -> str:
    """Who answers on the instance's port if not its engine: "" when the listening socket is
    its process's or its session's (or, where /proc cannot tell, while it still runs)."""
    own = await asyncio.to_thread(ports.held_by_session, launch.host, launch.port, process.pid)
    if own or (own is None and process.returncode is None):
        return ""
    if own is None:
        return "a process other than the engine, which has exited"
    return await asyncio.to_thread(ports.holder, launch.host, launch.port)


def _exited_early(instance: Instance, code: int, stranger: str) -> str:
    name, port = instance.name, instance.launch.port
    meanwhile = f"; meanwhile {stranger} answers on port {port}" if stranger else ""
    return (
        f"instance {name} exited with {describe_exit(code)} before it served{meanwhile}; "
        f"{instance.output.last_words()}"
    )


def _too_slow(instance: Instance, stranger: str) -> str:
    launch = instance.launch
    if stranger:
        return (
            f"instance {launch.name}: another process answers on port {launch.port}, not the "
            f"engine: {stranger}; {instance.output.last_words()}"
        )
    return (
        f"instance {launch.name} did not answer GET {launch.ready_path.decode()} at "
        f"{launch.url} within {launch.ready_timeout:g} s; {instance.output.last_words()}"
    )


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _drained(instance: Instance) -> None:
    """Until the engine's output has been read to its end."""
    if instance._forwarding is not None:
        await instance._forwarding


async def _ended(instance: Instance, how: str) -> None:
    """The engine's run is over: its output read to the end, then how it ended noted."""
    await _drained(instance)
    instance.output.end(how)
