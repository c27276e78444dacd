"""Settings of `parallama sim`: flags over `OLLAMA_*` environment variables over defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from parallama.core.kv_slots import CACHE_RULES, CacheRule
from parallama.errors import ConfigError
from parallama.protocol import ollama
from parallama.protocol.durations import DurationError, env_keep_alive_seconds, keep_alive_seconds
from parallama.sim.catalog import DEFAULT_MODELS, ModelSpec, spec_for
from parallama.sim.profiles import timing_for
from parallama.sim.scheduler import EvictionPolicy, OllamaSettings
from parallama.sim.timing import DEFAULT_PROFILE, PROFILES, TimingModel

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
CPU_MAX_LOADED_MODELS = 3  # Ollama: 0 means 3 per GPU, and 3 on a CPU-only machine


@dataclass(frozen=True)
class SimConfig:
    host: str = DEFAULT_HOST
    ports: tuple[int, ...] = (DEFAULT_PORT,)
    models: tuple[ModelSpec, ...] = field(
        default_factory=lambda: tuple(map(spec_for, DEFAULT_MODELS))
    )
    scheduler: OllamaSettings = field(default_factory=OllamaSettings)
    timing: TimingModel = field(default_factory=lambda: PROFILES[DEFAULT_PROFILE].timing)
    output_tokens: tuple[int, int] = (40, 120)  # natural answer length range, before num_predict
    seed: int = 0
    version: str = ollama.CURRENT_VERSION  # older releases lack routes (`--version 0.12.0`)
    # Not Ollama's (it tells nothing of the kind): how busy it is, as llama.cpp's server tells
    # it on /slots or vLLM on /metrics, for tests of a gateway that reads it.
    occupancy: Literal["none", "slots", "vllm"] = "none"
    prompt_cache: CacheRule = "llama-server"  # Ollama's since v0.30; its older runners' rules
    cache_ram_mib: int = 8192  # llama.cpp server's host-RAM prompt cache, per loaded model
    count_tokens: bool = False  # not Ollama's: /v1/messages/count_tokens, as llama.cpp's server


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None


def parse_ports(values: list[str]) -> tuple[int, ...]:
    """`--port 11434 --port 11435` or `--port 11434-11436`; 0 asks the OS for a free port."""
    ports: list[int] = []
    for value in values:
        first, sep, last = value.partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise ConfigError(
                f"--port {value!r}: expected a port number or a range like 11434-11436"
            ) from None
        if high < low:
            raise ConfigError(f"port range {value!r} runs backwards")
        ports.extend(range(low, high + 1))
    for port in ports:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} is out of range 0-65535")
    nonzero = [p for p in ports if p]
    if len(set(nonzero)) != len(nonzero):
        raise ConfigError("the same port is given twice")
    return tuple(ports)


def parse_host(value: str) -> tuple[str, int | None]:
    """`OLLAMA_HOST` forms: "host", "host:port", ":port", "http://host:port"."""
    text = value.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    if text.startswith("["):  # [::1]:11434
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        return host or DEFAULT_HOST, int(port) if port else None
    except ValueError:
        raise ConfigError(f"OLLAMA_HOST={value!r}: the port is not a number") from None


def parse_output_tokens(value: str) -> tuple[int, int]:
    try:
        low, _, high = value.partition("-")
        pair = (int(low), int(high or low))
    except ValueError:
        raise ConfigError(f"--output-tokens {value!r}: expected N or MIN-MAX") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise ConfigError(f"--output-tokens {value!r}: need 1 <= MIN <= MAX")
    return pair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `parallama sim` option (the flag help is the reference documentation)."""
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host", help=f"address to bind (default: from OLLAMA_HOST, else {DEFAULT_HOST})"
    )
    net.add_argument(
        "--port",
        action="append",
        metavar="PORT|FIRST-LAST",
        help="port of one emulated Ollama server; repeat it or give a range to run several "
        f"independent servers in one process (default: from OLLAMA_HOST, else {DEFAULT_PORT})",
    )

    conc = parser.add_argument_group("concurrency (as Ollama's environment variables)")
    conc.add_argument(
        "--num-parallel", type=int, help="slots per loaded model (OLLAMA_NUM_PARALLEL, default 1)"
    )
    conc.add_argument(
        "--max-queue",
        type=int,
        help="requests waiting to be scheduled before 503 'server busy' "
        "(OLLAMA_MAX_QUEUE, default 512)",
    )
    conc.add_argument(
        "--max-loaded-models",
        type=int,
        help=f"models loaded at once; 0 means {CPU_MAX_LOADED_MODELS} "
        "(OLLAMA_MAX_LOADED_MODELS, default 0)",
    )
    conc.add_argument(
        "--keep-alive",
        help="how long an idle model stays loaded: seconds or a duration like 5m; negative "
        "keeps it forever, 0 unloads at once (OLLAMA_KEEP_ALIVE, default 5m)",
    )
    conc.add_argument(
        "--context-length", type=int, help="default num_ctx (OLLAMA_CONTEXT_LENGTH, default 4096)"
    )
    conc.add_argument(
        "--eviction",
        choices=("ollama", "lru"),
        default="ollama",
        help="which idle model to unload for room: Ollama's order (shortest keep-alive first) "
        "or least recently used (default: ollama)",
    )

    models = parser.add_argument_group("models and timing")
    models.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="an installed model, repeatable (default: " + ", ".join(DEFAULT_MODELS) + "); names "
        "containing 'embed' are embedding models",
    )
    models.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME|FILE.toml",
        help="hardware profile from the seed's throughput table ("
        + ", ".join(sorted(PROFILES))
        + "; default: %(default)s), or a timing profile file (parallama plan --calibrate)",
    )
    models.add_argument(
        "--prefill-tps", type=float, help="prompt tokens/s per sequence (overrides the profile)"
    )
    models.add_argument(
        "--decode-tps",
        type=float,
        help="generated tokens/s of one sequence alone (overrides the profile)",
    )
    models.add_argument(
        "--batch-slowdown",
        type=float,
        help="each extra busy slot of a model slows every sequence by this fraction "
        "(overrides the profile)",
    )
    models.add_argument(
        "--load-seconds", type=float, help="time to load a model (overrides the profile)"
    )
    models.add_argument(
        "--batch-knee",
        type=int,
        metavar="N",
        help="room for N sequences only: past them, each more one slows every sequence by a "
        "whole step, so aggregate tokens/s peaks at N (default: no knee)",
    )
    models.add_argument(
        "--output-tokens",
        default="40-120",
        metavar="N|MIN-MAX",
        help="length of an answer when num_predict/max_tokens does not cut it "
        "(default: %(default)s)",
    )
    models.add_argument(
        "--seed", type=int, default=0, help="seed for the generated text (default: 0)"
    )
    models.add_argument(
        "--prompt-cache",
        choices=CACHE_RULES,
        default="llama-server",
        help="whose rules say which slot's cached prompt a request reuses: llama.cpp's server, "
        "which Ollama runs since v0.30 (with a host-RAM prompt cache; the default), or "
        "Ollama's own runners before it (ollama-legacy: the idle slot sharing the longest "
        "prefix; ollama-legacy-multiuser: with OLLAMA_MULTIUSER_CACHE=1)",
    )
    models.add_argument(
        "--cache-ram",
        type=int,
        default=8192,
        metavar="MIB",
        help="host RAM for prompts saved from slots, per loaded model, as llama.cpp's server "
        "keeps them (default: %(default)s, its default and Ollama's; 0: none)",
    )
    models.add_argument(
        "--ollama-version",
        default=ollama.CURRENT_VERSION,
        metavar="X.Y.Z",
        help="the Ollama release to be, in /api/version and its routes: before 0.14.0 there is "
        "no /v1/messages, before 0.13.3 no /v1/responses (default: %(default)s)",
    )
    models.add_argument(
        "--count-tokens",
        action="store_true",
        help="not Ollama's: count a Messages request's tokens on POST /v1/messages/count_tokens, "
        "as llama.cpp's server does",
    )
    models.add_argument(
        "--occupancy",
        choices=("none", "slots", "vllm"),
        default="none",
        help="not Ollama's: also tell how busy it is, as llama.cpp's server does on GET /slots "
        "or vLLM on GET /metrics (default: none, as Ollama)",
    )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> SimConfig:
    env = os.environ if env is None else env
    env_host, env_port = parse_host(env["OLLAMA_HOST"]) if env.get("OLLAMA_HOST") else (None, None)
    host = args.host or env_host or DEFAULT_HOST
    ports = (
        parse_ports(args.port) if args.port else (DEFAULT_PORT if env_port is None else env_port,)
    )

    def pick(flag: int | None, name: str, default: int) -> int:
        value = flag if flag is not None else _env_int(env, name)
        return default if value is None else value

    num_parallel = pick(args.num_parallel, "OLLAMA_NUM_PARALLEL", 1)
    max_queue = pick(args.max_queue, "OLLAMA_MAX_QUEUE", 512)
    max_loaded = (
        pick(args.max_loaded_models, "OLLAMA_MAX_LOADED_MODELS", 0) or CPU_MAX_LOADED_MODELS
    )
    num_ctx = pick(args.context_length, "OLLAMA_CONTEXT_LENGTH", 4096)
    if num_parallel < 1 or max_queue < 1 or max_loaded < 1 or num_ctx < 1:
        raise ConfigError(
            "num-parallel, max-queue, max-loaded-models and context-length must be positive"
        )
    try:
        if args.keep_alive is not None:
            number = _number_or_none(args.keep_alive)
            keep_alive = keep_alive_seconds(number if number is not None else args.keep_alive)
        elif env.get("OLLAMA_KEEP_ALIVE"):
            keep_alive = env_keep_alive_seconds(env["OLLAMA_KEEP_ALIVE"])
        else:
            keep_alive = 300.0
    except DurationError as exc:
        raise ConfigError(str(exc)) from None

    try:
        timing = timing_for(args.profile).with_overrides(
            prefill_tps=args.prefill_tps,
            decode_tps=args.decode_tps,
            batch_slowdown=args.batch_slowdown,
            load_seconds=args.load_seconds,
            batch_knee=args.batch_knee,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    eviction: EvictionPolicy = "lru" if args.eviction == "lru" else "ollama"
    return SimConfig(
        host=host,
        ports=ports,
        models=tuple(spec_for(m) for m in (args.model or DEFAULT_MODELS)),
        scheduler=OllamaSettings(
            num_parallel=num_parallel,
            max_queue=max_queue,
            max_loaded_models=max_loaded,
            default_keep_alive=keep_alive,
            default_num_ctx=num_ctx,
            eviction=eviction,
        ),
        timing=timing,
        output_tokens=parse_output_tokens(args.output_tokens),
        seed=args.seed,
        occupancy=args.occupancy,
        prompt_cache=args.prompt_cache,
        cache_ram_mib=args.cache_ram,
        version=_version(args.ollama_version),
        count_tokens=args.count_tokens,
    )


def _version(text: str) -> str:
    if ollama.parse_version(text) is None:
        raise ConfigError(f"--ollama-version {text!r}: expected a version such as 0.14.0")
    return text


def _number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
