"""Settings of `parallama serve`: one validated object from three sources.

A TOML file (`--config`), `PARALLAMA_*` environment variables and flags, each overriding the one
before. Every setting is declared once, below, with its default and description: the flags, their
help and the environment names are derived from it, so the three can never disagree.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from parallama.core.kv_slots import CacheRule
from parallama.core.router import Policy
from parallama.core.scheduler import SchedulerSettings
from parallama.errors import ConfigError
from parallama.protocol.hosts import host_of
from parallama.protocol.inspect import Dialect
from parallama.protocol.ollama import normalize_name

ENV_PREFIX = "PARALLAMA_"
__all__ = ["BackendSettings", "ConfigError", "GatewaySettings", "ModelSettings"]


def _slots(value: Any) -> int | Literal["auto"] | None:
    """A backend's `slots`: a whole number from 1, or "auto" (said so in one message)."""
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f'slots are a whole number from 1, or "auto", not {value!r}')


class BackendSettings(BaseModel):
    """One engine the gateway sends work to (an `[[backends]]` table in the file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="base URL of an Ollama server, e.g. http://127.0.0.1:11434")
    kind: Dialect = Field(
        "ollama",
        description="its API: ollama, or openai for an OpenAI-compatible engine (llama.cpp's "
        "server, vLLM, LM Studio, SGLang), to which Ollama requests are translated",
    )
    slots: Annotated[int | Literal["auto"] | None, PlainValidator(_slots)] = Field(
        None,
        description="parallel requests per model: its OLLAMA_NUM_PARALLEL; auto: learned, "
        "from min_slots to max_slots, as gives it the most tokens/s",
    )
    min_slots: int = Field(1, ge=1, description='slots = "auto": the fewest')
    max_slots: int = Field(8, ge=1, description='slots = "auto": the most')
    weight: float = Field(1.0, gt=0, description="relative capacity when comparing load")
    max_loaded_models: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="how many models it keeps loaded at once (its OLLAMA_MAX_LOADED_MODELS, or "
        "as many as its memory holds): model-affinity then loads a model there only into room, "
        "or in place of an idle model; absent: unknown",
    )
    models: frozenset[str] | None = Field(
        None, description="the only models sent here; absent: any model it has installed"
    )
    drain: bool = Field(
        False, description="take no new requests; those in flight finish (then remove it)"
    )
    occupancy: Literal["auto", "slots", "vllm", "none"] = Field(
        "auto",
        description="where to read how busy it is, counting requests that do not come through "
        "this gateway: llama.cpp server's /slots, vLLM's /metrics, none; auto: whichever an "
        "OpenAI-dialect engine answers (Ollama tells nothing of the kind)",
    )
    prompt_cache: CacheRule = Field(
        "llama-server",
        description="prefix-affinity: whose rules its prompt cache follows: llama.cpp's server "
        "(what Ollama runs since v0.30, with its 8 GiB host-RAM cache), or Ollama's own runners "
        "before v0.30 (ollama-legacy; ollama-legacy-multiuser with OLLAMA_MULTIUSER_CACHE=1)",
    )
    prompt_cache_ram: int = Field(
        8192,
        ge=0,
        le=2**20,
        description="prefix-affinity, llama-server: its host-RAM prompt cache, MiB (llama.cpp's "
        "--cache-ram, 8192 by default and in Ollama since v0.30; 0: none), counted in tokens of "
        "each model's f16 KV cache (from Ollama's /api/show; 64 KiB where not told)",
    )

    @field_validator("models")
    @classmethod
    def _normalized(cls, models: frozenset[str] | None) -> frozenset[str] | None:
        return None if models is None else frozenset(normalize_name(m) for m in models)

    @model_validator(mode="after")
    def _slot_bounds(self) -> BackendSettings:
        if self.min_slots > self.max_slots:
            raise ValueError(f"min_slots {self.min_slots} is more than max_slots {self.max_slots}")
        return self

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: a backend URL has no query or fragment")
        try:
            parts.port  # noqa: B018 -- raises on a malformed port
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        return url.strip().rstrip("/")


class ModelSettings(BaseModel):
    """How one model is served (a `[models."name"]` table in the file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routing: Policy | None = Field(None, description="routing policy for this model")
    target: str | None = Field(
        None, description="the backends' name for it: this name becomes an alias"
    )
    keep_alive: str | int | float | None = Field(
        None,
        description="keep_alive sent with every request for it (Ollama's: '10m', seconds, -1 "
        "for ever), whatever the client asked: no client unloads it for the others",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="runner options set on every request for it (num_ctx, num_batch, ...): no "
        "client's options make Ollama reload it",
    )
    strict: bool = Field(
        False, description="refuse (400) a request whose options differ from `options`"
    )
    warm: bool = Field(
        False,
        description="keep it loaded (an empty prompt at start, and whenever a backend restarted "
        "or evicted it): the first user never waits for the load",
    )
    replicas: int | None = Field(
        None, ge=1, description="warm: on so many of the backends that serve it (unset: all)"
    )

    @property
    def pinned(self) -> bool:
        return self.keep_alive is not None or bool(self.options)


def default_database() -> str:
    """A SQLite file in the platform's state directory (~/.local/state/parallama on Linux)."""
    import platformdirs

    return str(platformdirs.user_state_path("parallama") / "parallama.db")


class GatewaySettings(BaseModel):
    """Everything `parallama serve` can be told; the top level of the TOML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: tuple[BackendSettings, ...] = Field(
        min_length=1, description="the engines behind the gateway"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(11500, ge=0, le=65535, description="port to listen on (0: any free port)")
    slots: int = Field(
        1, ge=1, description="default slots per model for backends that do not set their own"
    )
    max_queue: int = Field(1024, ge=1, description="waiting requests, all models together")
    max_queue_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="bytes of request bodies waiting, all models together, before 503 + "
        "Retry-After (with max_body_bytes of 16 MiB, 1,024 waiting requests could hold 16 GiB)",
    )
    max_queue_per_model: int = Field(
        512, ge=1, description="waiting requests per model before 503 + Retry-After"
    )
    queue_timeout: float = Field(
        60.0, gt=0, description="seconds a request may wait for a slot before 503"
    )
    discipline: Literal["fifo", "fair"] = Field(
        "fifo",
        description="queue order: fifo (with X-Priority), or fair round-robin over clients "
        "(API key, X-Client-Id, else address)",
    )
    request_timeout: float = Field(
        300.0,
        gt=0,
        description="seconds a backend may stay silent (before its first byte or between chunks)",
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open a backend connection")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest request body accepted (else 413)"
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client may take to send a request's head, from connecting or "
        "from the request's first byte (else 408 and the connection closes)",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a client may pause while sending a request body (else 408)",
    )
    idle_timeout: float = Field(
        60.0, gt=0, description="seconds an idle keep-alive client connection stays open"
    )
    send_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a client may leave its answer unread before the connection closes",
    )
    drain_timeout: float = Field(
        25.0,
        ge=0,
        description="seconds a stopping gateway (SIGTERM, Ctrl-C) lets the requests in flight "
        "finish, no longer listening, before it cuts them; a second signal cuts them at once "
        "(below Kubernetes' default 30 s grace)",
    )
    listen_backlog: int = Field(
        0,
        ge=0,
        le=65535,
        description="connections the kernel completes and holds before the gateway accepts "
        "them; a burst past it loses its SYNs to retries (0: the system's net.core.somaxconn)",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="open client connections (at most half the file limit); more get 503",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="more Host names served when listening on loopback only: names, "
        ".domain for it and its subdomains, or * for any (comma-separated)",
    )
    allowed_origins: tuple[str, ...] = Field(
        (),
        description="more origins whose web pages may call the gateway (Ollama's "
        "OLLAMA_ORIGINS: a * matches anything, * alone any origin), beside Ollama's defaults: "
        "localhost, 127.0.0.1 and 0.0.0.0 pages, app://, file://, tauri://, vscode-webview://, "
        "vscode-file:// (comma-separated)",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as logfmt text or as JSON objects"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="least severe log level written"
    )
    log_requests: bool = Field(True, description="one log line per request (never its prompt)")
    routing: Policy = Field(
        "least-loaded",
        description="how a backend is chosen: least-loaded, round-robin, weighted, "
        "model-affinity, session-affinity or prefix-affinity",
    )
    occupancy_interval: float = Field(
        1.0, gt=0, description="seconds between two looks at how busy each engine says it is"
    )
    prefix_balance: float = Field(
        0.5,
        ge=0,
        description="prefix-affinity: how much busier, as a share of its capacity, the backend "
        "that may hold a request's prompt prefix may be than the least loaded one",
    )
    prefix_wait: float = Field(
        0.0,
        ge=0,
        le=1,
        description="prefix-affinity: the share of a request's prompt that a request running "
        "on a backend must hold beyond any free slot for it to follow there: to a free slot, "
        "or waiting for one (0: never)",
    )
    health_interval: float = Field(
        5.0, gt=0, description="seconds between probes of each backend (health, models)"
    )
    health_timeout: float = Field(2.0, gt=0, description="seconds a probe may take")
    failure_threshold: int = Field(
        3, ge=1, description="consecutive failures that open a backend's circuit breaker"
    )
    breaker_cooldown: float = Field(
        10.0, gt=0, description="seconds an open breaker waits before a trial request"
    )
    retries: int = Field(
        2, ge=0, description="other backends tried when one fails before the first byte"
    )
    busy_seconds: float = Field(
        30.0,
        gt=0,
        description="seconds a backend's slots stay halved after it answered 503 server busy",
    )
    admin_token: str | None = Field(
        None,
        description="bearer token for POST /parallama/reload (unset: loopback clients only)",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces endpoint (e.g. http://127.0.0.1:4318/v1/traces): a span "
        "per model request, with its queue wait, each backend attempt and its stream; the "
        "backends are sent a W3C traceparent",
    )
    trace_sample: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of requests traced when otlp_endpoint is set (a request that comes "
        "with a sampled traceparent always is)",
    )
    state: str = Field(
        "memory",
        description="memory: this process alone; redis://host:port/db: every gateway naming "
        "the same Redis shares the backends' slots",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="gateway processes on one port (SO_REUSEPORT), for more cores; more than "
        "one needs state = redis://",
    )
    auth: Literal["off", "keys"] = Field(
        "off",
        description="off: anyone who reaches the gateway may use it; keys: model routes and "
        "listings need an API key (parallama keys create)",
    )
    database: str = Field(
        default_factory=default_database,
        description="where keys and the usage ledger are kept: a SQLite file path, or "
        "postgresql://user:password@host/name",
    )
    ledger: Literal["auto", "on", "off"] = Field(
        "auto",
        description="write one row per finished model request to the database (auto: on "
        "when auth = keys)",
    )
    ledger_buffer: int = Field(
        100_000,
        ge=100,
        description="ledger rows kept in memory while the database is unreachable",
    )
    models: dict[str, ModelSettings] = Field(
        default_factory=dict, description='per-model settings: [models."name"] tables'
    )

    @field_validator("state")
    @classmethod
    def _state_url(cls, state: str) -> str:
        if state != "memory" and not state.startswith(("redis://", "rediss://")):
            raise ValueError("memory, or a Redis URL: redis://host:port/db")
        return state

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _host_list(cls, hosts: Any) -> Any:
        """`a,b` from the environment or a flag; a list from the file."""
        if isinstance(hosts, str):
            return tuple(h.strip() for h in hosts.split(",") if h.strip())
        return hosts

    @field_validator("allowed_hosts")
    @classmethod
    def _bare_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        """Names as the check compares them: lower case, without a port."""
        return tuple(
            h if h in ("*",) or h.startswith(".") else host_of(h)
            for h in (h.strip().lower() for h in hosts)
        )

    @field_validator("models")
    @classmethod
    def _normalized_names(cls, models: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name, model in models.items():
            if _is_pattern(name) and (model.warm or model.target is None or model.routing):
                raise ValueError(
                    f"models.{name!r}: a pattern names no one model: it takes a target, "
                    "and neither warm nor routing (set those on the target's own table)"
                )
        return {
            normalize_name(name): m.model_copy(
                update={"target": normalize_name(m.target) if m.target else None}
            )
            for name, m in models.items()
        }

    def slots_of(self, backend: BackendSettings) -> int:
        """Its slots per model (learned ones start at `min_slots`)."""
        if backend.slots == "auto":
            return backend.min_slots
        return backend.slots if backend.slots is not None else self.slots

    @property
    def scheduler(self) -> SchedulerSettings:
        return SchedulerSettings(
            max_queue=self.max_queue,
            max_queue_bytes=self.max_queue_bytes,
            max_queue_per_model=self.max_queue_per_model,
            queue_timeout=self.queue_timeout,
            discipline=self.discipline,
            routing=self.routing,
            routing_by_model={
                model.target or name: model.routing
                for name, model in self.models.items()
                if model.routing is not None
            },
            busy_seconds=self.busy_seconds,
            prefix_balance=self.prefix_balance,
            prefix_wait=self.prefix_wait,
            shared_slots=self.state != "memory",
        )

    @property
    def ledger_on(self) -> bool:
        return self.ledger == "on" or (self.ledger == "auto" and self.auth == "keys")

    @property
    def aliases(self) -> dict[str, str]:
        """Public model name -> the name the backends know (names, not patterns)."""
        return {n: m.target for n, m in self.models.items() if m.target and not _is_pattern(n)}

    def model_entry(self, name: str) -> ModelSettings | None:
        """How the model `name` (normalised) is served: its own `[models."name"]` table, else
        the first pattern that matches it (`[models."claude-*"]`, for the Claude names coding
        agents ask for), else None."""
        entry = self.models.get(name)
        if entry is not None:
            return entry
        return next(
            (m for n, m in self.models.items() if _is_pattern(n) and fnmatchcase(name, n)), None
        )


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def _scalar_settings() -> dict[str, Any]:
    tables = ("backends", "models")  # only in the file (backends also as --backend)
    return {n: f for n, f in GatewaySettings.model_fields.items() if n not in tables}


def _urls(text: str) -> list[dict[str, str]]:
    return [{"url": url.strip()} for url in text.split(",") if url.strip()]


def from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as `PARALLAMA_<SETTING>`; `PARALLAMA_BACKENDS` is a list of URLs
    separated by commas."""
    found: dict[str, Any] = {}
    for name in _scalar_settings():
        raw = env.get(env_name(name), "").strip()
        if raw:
            found[name] = raw
    backends = _urls(env.get(env_name("backends"), ""))
    if backends:
        found["backends"] = backends
    return found


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def describe_error(exc: ValidationError, sources: str) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{where}: {message}")
    return f"invalid settings ({sources}):\n  " + "\n  ".join(lines)


def config_path(path: Path | None, env: Mapping[str, str]) -> Path | None:
    """`--config`, else `PARALLAMA_CONFIG`, else none."""
    if path is None and env.get(env_name("config"), "").strip():
        return Path(env[env_name("config")].strip())
    return path


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    file_data: dict[str, Any] | None = None,
) -> GatewaySettings:
    """File, then environment, then flags: each given setting replaces the one before.
    `file_data`: the file's content, already read (`parallama up` takes its own tables out)."""
    env = os.environ if env is None else env
    path = config_path(path, env)
    if file_data is None:
        file_data = read_file(path) if path is not None else {}
    merged = dict(file_data)
    merged.update(from_environment(env))
    merged.update(flags or {})
    sources = ", ".join([*([str(path)] if path else []), f"{ENV_PREFIX}* environment", "flags"])
    try:
        return GatewaySettings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, sources)) from None


def database_of(
    path: Path | None, env: Mapping[str, str] | None = None, flag: str | None = None
) -> str:
    """The `database` setting as `parallama serve` would read it (file, environment, flag),
    for the commands that need only the database (`parallama keys`, `parallama usage`)."""
    env = os.environ if env is None else env
    path = config_path(path, env)
    found = read_file(path).get("database") if path is not None else None
    found = env.get(env_name("database"), "").strip() or found
    found = flag or found
    if found is not None and not isinstance(found, str):
        raise ConfigError(f"{path}: database: a file path or a postgresql:// URL")
    return found or default_database()


# -- flags -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`max_queue` is `--max-queue`); only flags given override."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with the settings below and [[backends]] tables "
        f"(env {env_name('config')})",
    )
    parser.add_argument(
        "--backend",
        action="append",
        dest="backends",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="an Ollama (or emulated) server, e.g. http://127.0.0.1:11434; repeat for several; "
        f"replaces the file's backends (env {env_name('backends')}, comma-separated)",
    )
    for name, info in _scalar_settings().items():
        flag = "--" + name.replace("_", "-")
        default = info.default if info.default_factory is None else info.default_factory()
        shown = str(default).lower() if isinstance(default, bool) else default
        help_text = f"{info.description} (default: {shown}; env {env_name(name)})"
        help_text = help_text.replace("%", "%%")
        kind = info.annotation
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        parser.add_argument(flag, **options)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> GatewaySettings:
    flags = {k: v for k, v in vars(args).items() if k in GatewaySettings.model_fields}
    if "backends" in flags:
        flags["backends"] = [{"url": url} for url in flags["backends"]]
    return load(args.config, env, flags)
