"""`parallama bench`: from the flags to a plan, a run with a progress bar, and the report."""

from __future__ import annotations

import argparse
import math
import os
import secrets
import socket
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson

from parallama.bench import report
from parallama.bench.runner import (
    Mode,
    Plan,
    Result,
    Setup,
    authorization,
    fixed_tokens,
    run_http,
)
from parallama.bench.sessions import SessionShape
from parallama.bench.trace import TraceError, read_trace
from parallama.bench.workload import SEED_QUESTIONS, Api, Kind, PromptError, Workload, load_prompts
from parallama.errors import ParallamaError

LISTINGS = {
    "ollama": ("/api/tags", "models", "name"),
    "openai": ("/v1/models", "data", "id"),
    "anthropic": ("/v1/models", "data", "id"),  # the gateway's, llama-server's and vLLM's
    "responses": ("/v1/models", "data", "id"),
}


class BenchError(ParallamaError):
    """A benchmark that cannot run as asked; the message says why."""

    exit_status = 2


def setups(targets: list[str], compare_pooling: bool) -> tuple[Setup, ...]:
    found = []
    for target in targets:
        label, _, url = target.partition("=") if "=" in target.split("://")[0] else ("", "", target)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BenchError(f"{target!r} is not an http:// URL (optionally LABEL=URL)")
        found.append(Setup(label or parts.netloc, url.rstrip("/")))
    if len({s.label for s in found}) != len(found):
        raise BenchError("two targets have the same label: name them, e.g. a=URL b=URL")
    if not compare_pooling:
        return tuple(found)
    if len(found) != 1:
        raise BenchError("--compare-pooling compares two ways of reaching one target: give one")
    (one,) = found
    return (
        Setup("new connection per request", one.url, fresh_connections=True),
        Setup("keep-alive pool", one.url),
    )


async def listed_models(setup: Setup, api: Api, api_key: str | None) -> list[str]:
    """The models a target lists; `BenchError` if it cannot be reached at all."""
    path, list_key, name_key = LISTINGS[api]
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10), headers=authorization(api_key)
            ) as session,
            session.get(setup.url + path) as answer,
        ):
            body = await answer.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if isinstance(exc, aiohttp.ClientConnectorError):
            error = exc.os_error
            if isinstance(error, socket.gaierror):  # its codes are not errno's
                reason = f"cannot resolve {parts_host(setup.url)}: {error.strerror}"
            else:
                reason = os.strerror(error.errno).lower() if error.errno else str(exc)
        else:
            reason = "no answer within 10 s" if isinstance(exc, TimeoutError) else str(exc)
        raise BenchError(f"cannot reach {setup.label} ({setup.url}): {reason}") from None
    try:
        rows = orjson.loads(body).get(list_key, [])
        return [row[name_key] for row in rows if isinstance(row.get(name_key), str)]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return []  # it answered, but lists nothing we can read: --model will have to say


def parts_host(url: str) -> str:
    return urlsplit(url).hostname or url


def choose_model(models: list[str], kind: Kind, setup: Setup) -> str:
    wanted = [m for m in models if ("embed" in m) == (kind == "embed")]
    if not wanted:
        raise BenchError(f"no --model given, and {setup.label} lists none for {kind}")
    return wanted[0]


def default_rounds(setups: int, requests: int | None, mode: Mode, levels: tuple[float, ...]) -> int:
    """Up to 4 rounds when setups are compared, but never so many that a closed-loop slice has
    fewer than twice as many requests as clients: ramp-up and drain would dominate it."""
    if setups == 1:
        return 1
    if mode == "rate" or requests is None:
        return 4
    return max(1, min(4, requests // int(2 * max(levels))))


async def replay_plan(args: argparse.Namespace, chosen: tuple[Setup, ...]) -> Plan:
    """`--replay TRACE`: each target gets the whole trace in turn, in real time over `--speed`
    (no warm-up: the trace's first requests are what they were), its prompts as long as
    traced as the first target counts them. `--model` sends every request to that model
    instead of the traced ones."""
    if args.requests or args.duration or args.compare_pooling or args.prompts:
        raise BenchError(
            "--replay sets the arrivals and the lengths: no --requests, --duration, "
            "--compare-pooling or --prompts"
        )
    if not 0 < args.speed < math.inf:
        raise BenchError("--speed must be positive")
    try:
        trace = read_trace(Path(args.replay))
    except TraceError as exc:
        raise BenchError(str(exc)) from None
    if args.model:
        trace = tuple(replace(t, model=args.model) for t in trace)
    workload = Workload(
        args.api,
        args.kind,
        trace[0].model,
        stream=args.stream,
        trace=trace,
        salt=secrets.token_hex(3),
    )
    plan = Plan(
        setups=chosen,
        workload=workload,
        mode="replay",
        levels=(args.speed,),
        requests=len(trace),
        timeout=args.timeout,
        api_key=args.api_key,
    )
    fixed = await fixed_tokens(plan)
    if fixed is None:
        raise BenchError(
            f"{plan.setups[0].label} did not answer a first request with its prompt's token "
            "count: check --api and --model"
        )
    return replace(plan, workload=replace(workload, fixed_tokens=fixed))


async def sessions_plan(args: argparse.Namespace, chosen: tuple[Setup, ...]) -> Plan:
    """`--sessions N --turns K`: coding-agent sessions arriving at `--rate` per second (default
    1), `N` per target over its rounds (default: 2 with several targets), no warm-up (an
    agent's first turn finds nothing cached either)."""
    if args.replay or args.concurrency or args.requests is not None or args.duration is not None:
        raise BenchError(
            "--sessions sets the requests: no --replay, --concurrency, --requests, --duration"
        )
    if args.kind != "chat" or args.compare_pooling or args.prompts:
        raise BenchError("--sessions are chats: no --kind, --prompts or --compare-pooling")
    for name in ("sessions", "turns", "system_tokens", "tool_tokens"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    rounds = args.rounds or (2 if len(chosen) > 1 and args.sessions >= 2 else 1)
    if rounds > args.sessions:
        raise BenchError("--rounds must be at most --sessions")
    model = args.model or choose_model(
        await listed_models(chosen[0], args.api, args.api_key), "chat", chosen[0]
    )
    shape = SessionShape(args.sessions, args.turns, args.system_tokens, args.tool_tokens)
    workload = Workload(
        args.api, "chat", model, stream=args.stream, max_tokens=args.max_tokens, sessions=shape
    )
    return Plan(
        setups=chosen,
        workload=workload,
        mode="sessions",
        levels=tuple(args.rate or [1.0]),
        rounds=rounds,
        arrivals=args.arrivals,
        timeout=args.timeout,
        seed=args.seed,
        api_key=args.api_key,
        salt=secrets.token_hex(3),
    )


async def plan_from(args: argparse.Namespace) -> Plan:
    chosen = setups(args.targets, args.compare_pooling)
    if args.api in ("anthropic", "responses") and args.kind != "chat":
        raise BenchError(f"--api {args.api} asks for chats only: no --kind {args.kind}")
    if args.sessions is not None:
        return await sessions_plan(args, chosen)
    if args.replay:
        return await replay_plan(args, chosen)
    distinct = {setup.url: setup for setup in chosen}  # --compare-pooling: one target, twice
    models = [await listed_models(setup, args.api, args.api_key) for setup in distinct.values()]
    model = args.model or choose_model(models[0], args.kind, chosen[0])
    try:
        prompts = tuple(load_prompts(Path(args.prompts))) if args.prompts else SEED_QUESTIONS
    except PromptError as exc:
        raise BenchError(str(exc)) from None
    mode: Mode = "rate" if args.rate else "concurrency"
    levels = tuple(args.rate or args.concurrency or [4.0])
    if mode == "concurrency" and any(level != int(level) for level in levels):
        raise BenchError("--concurrency takes whole numbers")
    requests = 32 if args.requests is None and args.duration is None else args.requests
    for name, value in (("--requests", requests), ("--duration", args.duration)):
        if value is not None and value <= 0:
            raise BenchError(f"{name} must be positive")
    rounds = args.rounds or default_rounds(len(chosen), requests, mode, levels)
    if rounds < 1 or (requests is not None and requests < rounds):
        raise BenchError("--rounds must be at least 1 and at most --requests")
    slices = requests // rounds if requests is not None else None
    if mode == "concurrency" and rounds > 1 and slices is not None and slices < max(levels):
        raise BenchError(
            f"--requests {requests} over {rounds} rounds gives slices of {slices}, "
            f"too few for {max(levels):g} concurrent clients: ask for more requests"
        )
    return Plan(
        setups=chosen,
        workload=Workload(
            args.api, args.kind, model, prompts, stream=args.stream, max_tokens=args.max_tokens
        ),
        mode=mode,
        levels=levels,
        requests=requests,
        duration=args.duration,
        rounds=rounds,
        arrivals=args.arrivals,
        timeout=args.timeout,
        warmup=max(args.warmup, 0),
        seed=args.seed,
        api_key=args.api_key,
    )


async def measure(plan: Plan) -> Result:
    """Run the plan, with a progress bar on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    total: float | None = None
    if plan.workload.sessions is not None:
        total = plan.workload.sessions.count * plan.workload.sessions.turns * len(plan.setups)
        total *= len(plan.levels)
    elif plan.requests is not None and plan.duration is None:
        total = (plan.requests * len(plan.levels) + plan.warmup) * len(plan.setups)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("parallama bench", total=total)
        return await run_http(plan, lambda: progress.advance(task))


def write_outputs(result: Result, args: argparse.Namespace) -> None:
    if args.json != "-":
        print(report.markdown(result), flush=True)
    if args.json:
        data = orjson.dumps(report.as_json(result), option=orjson.OPT_INDENT_2)
        if args.json == "-":
            sys.stdout.write(data.decode() + "\n")
        else:
            Path(args.json).write_bytes(data + b"\n")
    if args.plot:
        from parallama.bench.plot import plot

        plot(result, Path(args.plot))


async def bench(args: argparse.Namespace) -> int:
    """The exit status: 0, or 1 when the error rate passed `--max-error-rate`."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'parallama[plot]'") from None
    plan = await plan_from(args)
    result = await measure(plan)
    write_outputs(result, args)
    worst = report.worst_error_rate(result)
    if args.max_error_rate is not None and worst > args.max_error_rate:
        print(
            f"parallama bench: error rate {worst:.1%} is above --max-error-rate "
            f"{args.max_error_rate:.1%}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from parallama.runtime import run

    try:
        return run(bench(args))
    except KeyboardInterrupt:
        return 130
