"""`parallama up`: start the engines, wait until each serves, then run the gateway in front of
them until Ctrl-C or SIGTERM, and stop everything in order.

The instances come from the `--config` file's `[[instances]]` tables, or from `--instances N`
(N alike engines on consecutive ports), or from `--demo-real` (two llama-servers with a real
model); llama-server is the file's `llama_server` program or `--llama-server`, else the one on
PATH, else built here once (`launch.llama_build`). The gateway's settings are `parallama
serve`'s, from the same file, environment and flags, with one backend per instance added to any
`[[backends]]` the file lists. Each engine's output goes to its own file in `--log-dir`; the
console says when an instance changes state. Autoscaled groups (`autoscale` in a table, or
`--autoscale MIN:MAX`) start with their `min` engines; `parallama.launch.scaling` starts and
stops the others while the gateway runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from parallama import config
from parallama.config import GatewaySettings
from parallama.errors import ConfigError
from parallama.gateway.app import Gateway
from parallama.gateway.run import describe, running_gateway
from parallama.launch.engines import (
    InstanceSettings,
    Launch,
    demo_real,
    launch,
    template,
)
from parallama.launch.llama_build import ensure_llama_server, ensure_smollm2
from parallama.launch.options import DEFAULT_BASE_PORT
from parallama.launch.scaling import Scaling
from parallama.launch.supervisor import Instance, InstanceCollector, Supervisor, free_port
from parallama.runtime import stop_signals


class _Instances(BaseModel):
    """The file's `[[instances]]` tables, so that errors name them (`instances.0.port: ...`)."""

    instances: list[InstanceSettings]


def plan(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> tuple[GatewaySettings, list[Launch]]:
    """The gateway's settings and the engines to start; `ConfigError` for what cannot be."""
    env = os.environ if env is None else env
    path = config.config_path(args.config, env)
    data = config.read_file(path) if path is not None else {}
    instances = _instances(args, data.pop("instances", []), str(path))
    program = args.llama_server or data.pop("llama_server", None)
    if not isinstance(program, str | None):
        raise ConfigError(f"{path}: llama_server must be the path of a program")
    llama_server = "llama-server"
    if any(i.engine == "llama-server" and i.command is None for i in instances):
        llama_server = str(ensure_llama_server(program))
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir(env)
    taken = {(i.host, i.port + k) for i in instances if i.port for k in range(i.engines)}
    launches = []
    for i, instance in enumerate(instances):
        for k in range(instance.engines):
            port = instance.port + k if instance.port else _free_port(instance.host, taken)
            member = 0 if instance.autoscale is None else k + 1
            launches.append(
                launch(instance, i, port, log_dir=log_dir, member=member, llama_server=llama_server)
            )
    _all_different(launches, [b.get("url") for b in data.get("backends", [])])
    data["backends"] = [item.backend.model_dump() for item in launches] + data.get("backends", [])
    flags = {k: v for k, v in vars(args).items() if k in GatewaySettings.model_fields}
    if "backends" in flags:  # --backend: more backends, not started here
        data["backends"] += [{"url": url} for url in flags.pop("backends")]
    return config.load(path, env, flags, file_data=data), launches


def _free_port(host: str, taken: set[tuple[str, int]]) -> int:
    """A free port not given to another instance already (the kernel may offer one twice)."""
    while (host, port := free_port(host)) in taken:
        pass
    taken.add((host, port))
    return port


def _all_different(launches: list[Launch], backends: list[Any]) -> None:
    """`ConfigError` unless every instance, group and engine address is its own: two engines on
    one port would be one backend to the gateway, each taking the other out of its routing."""
    names = [item.name for item in launches]
    groups = {item.group for item in launches if item.autoscale is not None}
    if len(set(names)) != len(names) or groups & set(names):
        raise ConfigError(f"instance names must differ: {', '.join(sorted({*names, *groups}))}")
    urls = [item.url for item in launches] + [str(url) for url in backends if url]
    twice = sorted({url for url in urls if urls.count(url) > 1})
    if twice:
        raise ConfigError(f"two engines or backends on one address: {', '.join(twice)}")


def default_log_dir(env: Mapping[str, str]) -> Path:
    """Where the engines' log files go without --log-dir: the user's state directory (XDG)."""
    state = env.get("XDG_STATE_HOME", "")
    if not Path(state).is_absolute():  # unset, or relative, which XDG says to ignore
        home = env.get("HOME") or str(Path.home())
        state = str(Path(home) / ".local" / "state")
    return Path(state) / "parallama" / "logs"


def _instances(args: argparse.Namespace, tables: Any, source: str) -> list[InstanceSettings]:
    try:
        if args.demo_real:  # free ports: the gateway's --port 0 must not leave them on 11434
            return demo_real(args.base_port or 0, str(ensure_smollm2()))
        if args.instances is not None or args.autoscale is not None:
            count, autoscale = _count(args.instances, args.autoscale, args.gpus)
            return template(
                args.engine,
                count,
                DEFAULT_BASE_PORT if args.base_port is None else args.base_port,
                autoscale=autoscale,
                gpus=args.gpus,
                command=shlex.split(args.engine_command) if args.engine_command else None,
                num_parallel=args.num_parallel,
                keep_alive=args.keep_alive,
                model=args.model,
                alias=args.alias,
                threads=args.threads,
                parallel=args.parallel,
            )
        instances = _Instances.model_validate({"instances": tables}).instances
    except ValidationError as exc:
        raise ConfigError(config.describe_error(exc, source)) from None
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if not instances:
        raise ConfigError(
            "nothing to start: give [[instances]] tables in --config, --instances N, or --demo-real"
        )
    return instances


def _count(
    instances: int | None, autoscale: str | None, gpus: int
) -> tuple[int, dict[str, int] | None]:
    """`--instances N` or `--autoscale MIN:MAX`: how many tables, and their autoscaling."""
    if autoscale is None:
        if instances is None or instances < 1:
            raise ConfigError("--instances must be at least 1")
        return instances, None
    if instances is not None:
        raise ConfigError("--instances and --autoscale: give one of them")
    if gpus:
        raise ConfigError("--gpus spreads --instances over GPUs, not an --autoscale group")
    low, colon, high = autoscale.partition(":")
    if not (colon and low.isdigit() and high.isdigit()):
        raise ConfigError(f"--autoscale wants MIN:MAX, such as 0:4, not {autoscale!r}")
    return 1, {"min": int(low), "max": int(high)}


async def run_up(settings: GatewaySettings, launches: list[Launch]) -> None:
    supervisor = Supervisor(launches)
    with stop_signals() as stop:
        names = ", ".join(_described(supervisor))
        print(f"parallama up: starting {names}", flush=True)
        if not await _unless_stopped(stop, supervisor.start()):
            return
        try:
            async with running_gateway(settings) as gateway:
                scaling = Scaling(supervisor, gateway.scheduler)
                gateway.status_sections["instances"] = supervisor.status
                gateway.metrics.registry.register(InstanceCollector(supervisor))
                if scaling.groups:
                    gateway.status_sections["autoscaling"] = scaling.status
                    gateway.metrics.registry.register(scaling.collector())
                _route_while_ready(supervisor, gateway)
                scaling.start()
                lines = [describe(gateway, "up"), *map(_banner_line, supervisor.instances)]
                print("\n".join(lines) + "\nCtrl-C to stop everything", flush=True)
                try:
                    await stop.wait()
                finally:
                    await scaling.stop()
                    supervisor.on_state = None  # the gateway stops before the engines
        finally:
            await supervisor.stop()


def _described(supervisor: Supervisor) -> list[str]:
    """The instances to start, and each autoscaled group as `NAME (MIN to MAX engines)`."""
    named, groups = [], set()
    for instance in supervisor.instances:
        launch = instance.launch
        if launch.autoscale is None:
            named.append(launch.name)
        elif launch.group not in groups:
            groups.add(launch.group)
            named.append(
                f"{launch.group} ({launch.autoscale.min} to {launch.autoscale.max} engines)"
            )
    return named


def _route_while_ready(supervisor: Supervisor, gateway: Gateway) -> None:
    """The gateway sends an instance work only while it is ready: from the moment its process
    exits until the restarted one serves, whatever else answers on its port gets nothing."""

    def follow(instance: Instance) -> None:
        ready = instance.state == "ready"
        standby = instance.launch.autoscale is not None  # requests wait for its (re)start
        gateway.fleet.set_online(instance.launch.url, ready, standby=standby and not ready)

    supervisor.on_state = follow
    for instance in supervisor.instances:  # one may have died since it started
        follow(instance)


def _banner_line(instance: Instance) -> str:
    launch = instance.launch
    log = f"  log {launch.log_file}" if launch.log_file is not None else ""
    argv = shlex.join(launch.argv)
    if instance.state == "stopped":  # of an autoscaled group: started when work waits
        return f"  instance {instance.name}  stopped until needed  {launch.url}{log}  {argv}"
    return f"  instance {instance.name}  pid {instance.pid}  {launch.url}{log}  {argv}"


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` unless a stop signal comes first (then cancel it); True if it finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
