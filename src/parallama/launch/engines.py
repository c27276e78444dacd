"""The engine processes `parallama up` starts: their settings (`[[instances]]` tables) and the
command line, environment and gateway backend each one becomes (sans-I/O).

An instance is one engine on one port: `ollama serve` told its address and concurrency through
Ollama's environment variables, exactly as the seed's start script does; llama.cpp's own server,
`llama-server` (the user's, or one built here: `launch.llama_build`), which Ollama itself runs
for every GGML model since v0.30; the emulator; or any command. `command` replaces the program
(say, the emulator standing in for `ollama serve`); `{host}`, `{port}`, `{name}` and `{model}`
in it and in `args` are filled in.

A table with `autoscale = { min = ..., max = ... }` is a group of up to `max` alike engines,
`NAME.1` to `NAME.max`, on consecutive ports from `port` (or free ones): `parallama up` starts
and stops them as the work asks (`parallama.launch.autoscale` decides when).

llama.cpp repacks weights into the CPU's "extra buffer types" (AMX tiles, ...) by default; some
builds crash on CPUs with AMX in those buffers, so there it is off unless `repack = true`.

llama-server serves HTTP from a pool of threads, each holding one connection for as long as the
client keeps it open (cpp-httplib), sized by default from its slots and the CPU count (the larger
of slots + 4 and CPUs - 1); past them it starts short-lived extra threads. So that the gateway's
pooled connections, its probes and any outside client never depend on those, `parallama up`
gives it a thread for every slot's connection, one idle one each, and the probes beside them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parallama.config import BackendSettings
from parallama.launch.autoscale import ScalePolicy
from parallama.protocol.inspect import Dialect
from parallama.protocol.ollama import normalize_name
from parallama.runtime import http_url

Engine = Literal["ollama", "sim", "llama-server", "command"]
SMOLLM2_ALIAS = "smollm2:135m"
AMX_FLAGS = frozenset({"amx_tile", "amx_int8"})  # /proc/cpuinfo's names for Intel AMX
LLAMA_SERVER_SLOTS = 4  # llama-server's own default (`-np -1`: auto, four)
HTTP_THREADS_BESIDE_SLOTS = 8  # llama-server: for probes, listings and outside clients
_POLICY = ScalePolicy()  # its defaults


class AutoscaleSettings(BaseModel):
    """An `[[instances]]` table's `autoscale`: how many of its engines run, as the work asks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(_POLICY.min, ge=0, description="engines kept running, even when idle")
    max: int = Field(ge=1, description="engines at most")
    wait_up: float = Field(
        _POLICY.wait_up, ge=0, description="seconds a request may wait before the wait counts"
    )
    sustain: float = Field(
        _POLICY.sustain, ge=0, description="seconds the wait must go on before an engine starts"
    )
    idle_after: float = Field(
        _POLICY.idle_after, gt=0, description="seconds without work before an engine stops"
    )
    cooldown: float = Field(_POLICY.cooldown, ge=0, description="seconds between two decisions")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscaleSettings:
        if self.min > self.max:
            raise ValueError(f"autoscale needs min <= max, not min = {self.min} > max = {self.max}")
        return self

    def policy(self) -> ScalePolicy:
        return ScalePolicy(**self.model_dump())


class InstanceSettings(BaseModel):
    """One engine process (an `[[instances]]` table in the file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Engine = Field("ollama", description="what runs")
    name: str = Field("", description="shown in logs and status (default: engine-index)")
    host: str = Field("127.0.0.1", description="address the engine listens on")
    port: int = Field(ge=0, le=65535, description="its port; 0: a free port chosen at start")
    command: tuple[str, ...] | None = Field(
        None, min_length=1, description="program and arguments instead of the engine's own"
    )
    args: tuple[str, ...] = Field((), description="more arguments after the engine's own")
    env: dict[str, str] = Field(default_factory=dict, description="more environment variables")
    num_parallel: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Ollama and emulator: OLLAMA_NUM_PARALLEL (also the gateway's slots)"
    )
    keep_alive: str | None = Field(None, description="Ollama and emulator: OLLAMA_KEEP_ALIVE")
    max_loaded_models: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Ollama and emulator: OLLAMA_MAX_LOADED_MODELS"
    )
    gpus: str | None = Field(None, description='CUDA_VISIBLE_DEVICES, e.g. "0" or "2,3"')
    model: str | None = Field(None, description="llama-server: the GGUF file")
    alias: str | None = Field(None, description="llama-server: the model's name for clients")
    threads: Annotated[int, Field(ge=1)] | None = Field(None, description="llama-server: threads")
    ctx: Annotated[int, Field(ge=0)] | None = Field(
        None, description="llama-server: context size, shared by its slots"
    )
    parallel: Annotated[int, Field(ge=1)] | None = Field(
        None, description=f"llama-server: parallel slots (default {LLAMA_SERVER_SLOTS})"
    )
    cache_ram: Annotated[int, Field(ge=0)] | None = Field(
        None, description="llama-server: host-RAM prompt cache, MiB (default 8192; 0: none)"
    )
    threads_http: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="llama-server: HTTP threads (default: two per slot and "
        f"{HTTP_THREADS_BESIDE_SLOTS} more)",
    )
    repack: bool | None = Field(
        None,
        description="llama-server: repack weights into the CPU's extra buffer types (AMX, ...); "
        "default: off on CPUs with AMX, where it crashes some builds, on elsewhere",
    )
    dialect: Dialect | None = Field(
        None, description="command: the API it speaks, ollama (default) or openai"
    )
    slots: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the gateway's slots for it (default: from its concurrency)"
    )
    weight: float = Field(1.0, gt=0, description="the gateway's weight for it")
    models: frozenset[str] | None = Field(None, description="the only models sent to it")
    ready_timeout: float = Field(120.0, gt=0, description="seconds it may take to start")
    autoscale: AutoscaleSettings | None = Field(
        None, description="a group of up to `max` such engines, started and stopped on demand"
    )

    @field_validator("models")
    @classmethod
    def _normalized(cls, models: frozenset[str] | None) -> frozenset[str] | None:
        return None if models is None else frozenset(normalize_name(m) for m in models)

    @model_validator(mode="after")
    def _complete(self) -> InstanceSettings:
        if self.engine == "llama-server" and not self.model and not self.command:
            raise ValueError(f"a {self.engine} instance needs model = the path of a GGUF file")
        if self.engine == "command" and not self.command:
            raise ValueError("a command instance needs command = [program, arguments...]")
        if self.port and self.port + self.engines - 1 > 65535:
            raise ValueError(f"{self.engines} engines from port {self.port} go past port 65535")
        return self

    @property
    def engines(self) -> int:
        """How many engines the table stands for: its group's `max`, else one."""
        return 1 if self.autoscale is None else self.autoscale.max


@dataclass(frozen=True)
class Launch:
    """How to start one instance, and how the gateway then sees it."""

    name: str
    group: str  # its `[[instances]]` table's name (its own, when not a group)
    autoscale: ScalePolicy | None  # its group's, if autoscaled
    argv: tuple[str, ...]
    env: dict[str, str]  # added to parallama's own environment
    host: str
    port: int
    url: str
    dialect: Dialect
    ready_path: bytes  # answers 200 once the engine serves requests
    ready_timeout: float
    backend: BackendSettings
    log_file: Path | None  # where its output goes (None: only parallama's debug log)


def launch(
    instance: InstanceSettings,
    index: int,
    port: int,
    *,
    amx: bool | None = None,
    log_dir: Path | None = None,
    member: int = 0,
    llama_server: str = "llama-server",
) -> Launch:
    """The command line and environment of `instance` (of the `member`th engine of its group,
    from 1, when it is autoscaled), listening on `port` (the configured one, or the free one
    chosen for 0), on a CPU with or without AMX (default: this machine's), its output written to
    a file in `log_dir`; `llama_server`: the program a llama-server instance runs."""
    group = instance.name or f"{instance.engine}-{index}"
    name = f"{group}.{member}" if member else group
    repack = instance.repack if instance.repack is not None else not _has_amx(amx)
    alias = instance.alias or (Path(instance.model).stem if instance.model else "")
    fill = {"host": instance.host, "port": str(port), "name": name, "model": instance.model or ""}
    env = dict(_ollama_environment(instance, port)) if _speaks_ollama(instance) else {}
    if instance.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = instance.gpus
    env |= instance.env
    own = _engine_arguments(instance, port, alias, repack=repack, llama_server=llama_server)
    program = instance.command if instance.command is not None else own
    argv = tuple(a.format_map(fill) for a in (*program, *instance.args))
    dialect: Dialect = "ollama" if _speaks_ollama(instance) else "openai"
    url = http_url(instance.host, port)
    backend = BackendSettings(
        url=url,
        kind=dialect,
        slots=instance.slots or _slots(instance),
        weight=instance.weight,
        models=instance.models,
        # the room model affinity respects (0 is Ollama's own default: not known here)
        max_loaded_models=instance.max_loaded_models or None,
        **_prompt_cache(instance),
    )
    return Launch(
        name=name,
        group=group,
        autoscale=None if instance.autoscale is None else instance.autoscale.policy(),
        argv=argv,
        env=env,
        host=instance.host,
        port=port,
        url=url,
        dialect=dialect,
        ready_path=b"/api/version" if dialect == "ollama" else b"/v1/models",
        ready_timeout=instance.ready_timeout,
        backend=backend,
        log_file=None if log_dir is None else log_dir / log_file_name(name),
    )


def log_file_name(name: str) -> str:
    """An instance's log file: its name, with anything a file name should not hold replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") + ".log"


def _has_amx(amx: bool | None) -> bool:
    return cpu_has_amx() if amx is None else amx


def cpu_has_amx() -> bool:
    """Whether this machine's CPU has Intel AMX (False where /proc/cpuinfo cannot be read)."""
    try:
        return has_amx(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def has_amx(cpuinfo: str) -> bool:
    """Whether the `flags` lines of a /proc/cpuinfo text name AMX."""
    return any(
        AMX_FLAGS & set(line.partition(":")[2].split())
        for line in cpuinfo.splitlines()
        if line.startswith("flags")
    )


def _speaks_ollama(instance: InstanceSettings) -> bool:
    if instance.engine == "command":
        return instance.dialect != "openai"
    return instance.engine in ("ollama", "sim")


def _ollama_environment(instance: InstanceSettings, port: int) -> dict[str, str]:
    """Ollama's own settings (the emulator reads the same ones)."""
    host = f"[{instance.host}]" if ":" in instance.host else instance.host
    env = {"OLLAMA_HOST": f"{host}:{port}"}
    if instance.num_parallel is not None:
        env["OLLAMA_NUM_PARALLEL"] = str(instance.num_parallel)
    if instance.keep_alive is not None:
        env["OLLAMA_KEEP_ALIVE"] = instance.keep_alive
    if instance.max_loaded_models is not None:
        env["OLLAMA_MAX_LOADED_MODELS"] = str(instance.max_loaded_models)
    return env


def _engine_arguments(
    instance: InstanceSettings, port: int, alias: str, *, repack: bool, llama_server: str
) -> tuple[str, ...]:
    match instance.engine:
        case "ollama":
            return ("ollama", "serve")
        case "sim":
            return (sys.executable, "-m", "parallama", "sim")
        case "llama-server":
            slots = _slots(instance)
            argv = [llama_server, "--model", instance.model or "", "--alias", alias]
            argv += ["--host", instance.host, "--port", str(port), "--parallel", str(slots)]
            # Prompt processing too: its default is every core, and two engines spinning on the
            # same cores each slow to a crawl.
            argv += _optional("--threads", instance.threads)
            argv += _optional("--threads-batch", instance.threads)
            argv += _optional("--ctx-size", instance.ctx)
            argv += _optional("--cache-ram", instance.cache_ram)
            http = instance.threads_http or 2 * slots + HTTP_THREADS_BESIDE_SLOTS
            argv += ["--threads-http", str(http), "--metrics", "--slots", "--no-webui"]
            argv += [] if repack else ["--no-repack"]
            return tuple(argv)
        case "command":
            return ()


def _optional(flag: str, value: int | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _slots(instance: InstanceSettings) -> int:
    if instance.engine == "llama-server":
        return instance.parallel or LLAMA_SERVER_SLOTS
    return instance.num_parallel or 1  # Ollama's default since v0.10


def _prompt_cache(instance: InstanceSettings) -> dict[str, object]:
    """What prefix affinity is told of a llama-server's prompt cache: the RAM it was given."""
    if instance.engine == "llama-server" and instance.cache_ram is not None:
        return {"prompt_cache": "llama-server", "prompt_cache_ram": instance.cache_ram}
    return {}


def template(
    engine: Engine,
    count: int,
    base_port: int,
    *,
    gpus: int = 0,
    **common: object,
) -> list[InstanceSettings]:
    """`--instances N`: N alike instances on consecutive ports (each on a free port when the
    base port is 0), and with `gpus`, one GPU each in turn, as in the seed's script."""
    return [
        InstanceSettings.model_validate(
            {
                "engine": engine,
                "port": base_port + i if base_port else 0,
                **({"gpus": str(i % gpus)} if gpus else {}),
                **{k: v for k, v in common.items() if v is not None},
            }
        )
        for i in range(count)
    ]


def demo_real(base_port: int, model: str, count: int = 2) -> list[InstanceSettings]:
    """Two llama-servers with SmolLM2-135M (the GGUF file at `model`), one thread and two slots
    each: a real model on any CPU."""
    return template(
        "llama-server", count, base_port, model=model, alias=SMOLLM2_ALIAS, threads=1,
        ctx=8192, parallel=2, cache_ram=1024,
    )  # fmt: skip
