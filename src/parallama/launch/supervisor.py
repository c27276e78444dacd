"""Engine processes kept running: started, waited on until they serve, their output forwarded
line by line under their name, restarted with backoff when they die, and stopped (with whatever
they started) when parallama stops.

Each engine runs in a session of its own, so Ctrl-C at the terminal reaches parallama alone and
the engines are stopped in order: SIGTERM to the engine's whole process group (`ollama serve`
starts a runner process per model), then SIGKILL if it has not exited after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from parallama.gateway.upstream import Upstream
from parallama.launch.engines import Launch

log = logging.getLogger("parallama.launch")
output_log = logging.getLogger("parallama.engine")

State = Literal["starting", "ready", "restarting", "stopped"]
LAST_LINES = 20  # of each engine's output, kept for the error that says why it did not start
MAX_LINE = 4096
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_SECONDS = 60.0  # up this long, a crash counts as the first again
LOOK_EVERY = 0.2  # seconds between readiness checks of a starting engine


class LaunchError(Exception):
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
        self.started_at = 0.0
        self.output: deque[str] = deque(maxlen=LAST_LINES)
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
        }

    def last_words(self) -> str:
        if not self.output:
            return "it printed nothing"
        return "its last output:\n    " + "\n    ".join(self.output)


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
        self, launches: list[Launch], on_ready: Callable[[Instance], None] | None = None
    ) -> None:
        """`on_ready` is told each time an instance (re)starts serving: the gateway probes it
        at once rather than at its next health check."""
        self.instances = [Instance(launch) for launch in launches]
        self.on_ready = on_ready
        self._watchers: list[asyncio.Task[None]] = []

    def status(self) -> list[dict[str, Any]]:
        return [instance.status() for instance in self.instances]

    async def start(self) -> None:
        """Start every instance and return once all serve; if one cannot, stop them all and
        raise `LaunchError`."""
        starting = [asyncio.ensure_future(self._start(i)) for i in self.instances]
        try:
            await asyncio.gather(*starting)
        except BaseException:
            for task in starting:  # the others, mid-start: each stops where it is
                task.cancel()
            await asyncio.gather(*starting, return_exceptions=True)
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(i)) for i in self.instances]

    async def stop(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(self._terminate(i) for i in self.instances))
        for instance in self.instances:
            instance.state = "stopped"

    # -- one instance ---------------------------------------------------------------------------

    async def _start(self, instance: Instance) -> None:
        await self._spawn(instance)
        try:
            await self._until_ready(instance)
        except LaunchError:
            await self._terminate(instance)
            raise
        instance.state = "ready"
        log.info(
            "instance ready",
            extra={"fields": {"instance": instance.name, "url": instance.launch.url}},
        )
        if self.on_ready is not None:
            self.on_ready(instance)

    async def _spawn(self, instance: Instance) -> None:
        launch = instance.launch
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
        instance.state = "starting"
        instance.started_at = time.monotonic()
        assert process.stdout is not None
        instance._forwarding = asyncio.get_running_loop().create_task(
            _forward(instance, process.stdout)
        )
        log.info(
            "instance started",
            extra={"fields": {"instance": launch.name, "pid": process.pid, "url": launch.url}},
        )

    async def _until_ready(self, instance: Instance) -> None:
        """Ask the engine its ready path until it answers 200, it exits, or time runs out."""
        launch, process = instance.launch, instance.process
        assert process is not None
        exited = asyncio.ensure_future(process.wait())
        upstream = Upstream(launch.url, connect_timeout=1.0, read_timeout=5.0)
        try:
            async with asyncio.timeout(launch.ready_timeout):
                while (await upstream.get(launch.ready_path, 5.0))[0] != 200:
                    await asyncio.wait({exited}, timeout=LOOK_EVERY)
                    if exited.done():
                        await _drained(instance)
                        raise LaunchError(
                            f"instance {launch.name} exited with code {exited.result()} "
                            f"before it served; {instance.last_words()}"
                        )
        except TimeoutError:
            raise LaunchError(
                f"instance {launch.name} did not answer GET {launch.ready_path.decode()} at "
                f"{launch.url} within {launch.ready_timeout:g} s; {instance.last_words()}"
            ) from None
        finally:
            exited.cancel()
            await upstream.close()

    async def _watch(self, instance: Instance) -> None:
        """Restart the instance whenever it exits: at once after a long run, else after a
        backoff that doubles with each quick failure in a row."""
        quick_failures = 0
        while True:
            assert instance.process is not None
            code = await instance.process.wait()
            await _drained(instance)
            _kill_group(instance.process.pid, signal.SIGKILL)  # what it started, if still there
            instance.last_exit = code
            instance.state = "restarting"
            ran = time.monotonic() - instance.started_at
            quick_failures = 0 if ran >= STABLE_SECONDS else quick_failures + 1
            delay = min(FIRST_BACKOFF * 2 ** (quick_failures - 1), MAX_BACKOFF)
            delay = delay if quick_failures else 0.0
            log.warning(
                "instance exited",
                extra={"fields": {"instance": instance.name, "code": code, "restart_in": delay}},
            )
            await asyncio.sleep(delay)
            instance.restarts += 1
            try:
                await self._start(instance)
            except LaunchError as exc:
                log.error("restart failed", extra={"fields": {"error": str(exc)}})

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
            log.info(
                "instance stopped", extra={"fields": {"instance": instance.name, "code": code}}
            )
        await _drained(instance)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _drained(instance: Instance) -> None:
    """Until the engine's output has been read to its end."""
    if instance._forwarding is not None:
        await instance._forwarding


async def _forward(instance: Instance, stream: asyncio.StreamReader) -> None:
    """The engine's output, one log line per line it prints, under its name (a line longer
    than `MAX_LINE` is cut)."""
    pending = b""
    while chunk := await stream.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) > MAX_LINE:
            lines.append(pending)
            pending = b""
        for line in lines:
            _emit(instance, line)
    if pending:
        _emit(instance, pending)


def _emit(instance: Instance, raw: bytes) -> None:
    line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip()
    if line:
        instance.output.append(line)
        output_log.info(line, extra={"fields": {"instance": instance.name}})
