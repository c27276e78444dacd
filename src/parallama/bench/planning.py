"""`parallama plan`: how many instances of some hardware a workload needs, found by simulation
(`simulate.py`) rather than by buying the GPUs first.

It answers three questions: with 1, 2, 4 ... instances of this hardware profile, what QPS,
latency and time to first token does this workload get; with `--target-qps` and `--target-p99`,
the fewest instances that serve that rate of arrivals with that p99 and no errors; and with
`--replay TRACE`, how the traffic that really came (`parallama usage --trace`) would have fared
on each candidate fleet (instances x slots x routing), and the cheapest that meets
`--target-p99`. The servers are taken as warm (models loaded: the steady state), unless
`--load-seconds` says otherwise; the hardware is a named profile, or one measured on a real
engine (`--calibrate`, `calibration.py`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import orjson

from parallama.bench import report
from parallama.bench.main import BenchError
from parallama.bench.planning_options import DEFAULT_MODEL
from parallama.bench.runner import Plan, Result, Setup, Slice
from parallama.bench.simulate import simulate
from parallama.bench.stats import Summary
from parallama.bench.trace import (
    MAX_REQUESTS,
    TracedRequest,
    TraceError,
    from_ledger,
    read_trace,
)
from parallama.bench.workload import SEED_QUESTIONS, PromptError, Workload, load_prompts
from parallama.config import database_of
from parallama.core.router import Policy
from parallama.errors import ConfigError
from parallama.sim.catalog import spec_for
from parallama.sim.config import SimConfig, parse_output_tokens
from parallama.sim.profiles import timing_for
from parallama.sim.scheduler import OllamaSettings
from parallama.sim.timing import TimingModel
from parallama.teams.keys import parse_age
from parallama.teams.store import open_store


def timing(args: argparse.Namespace) -> TimingModel:
    try:
        return timing_for(args.profile)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None


def sim_config(
    args: argparse.Namespace, num_parallel: int, models: tuple[str, ...] | None = None
) -> SimConfig:
    try:
        output_tokens = parse_output_tokens(args.output_tokens)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    names = models or (args.model or DEFAULT_MODEL,)
    return SimConfig(
        models=tuple(spec_for(m) for m in names),
        scheduler=OllamaSettings(
            num_parallel=num_parallel, max_loaded_models=args.max_loaded_models or len(names)
        ),
        timing=replace(timing(args), load_seconds=args.load_seconds or 0.0),
        output_tokens=output_tokens,
        seed=args.seed,
    )


def workload_plan(args: argparse.Namespace, counts: list[int], rate: float | None) -> Plan:
    try:
        prompts = tuple(load_prompts(Path(args.prompts))) if args.prompts else SEED_QUESTIONS
    except PromptError as exc:
        raise BenchError(str(exc)) from None
    concurrency = args.concurrency or 8.0
    return Plan(
        setups=tuple(Setup(label(n, args), f"sim://{n}") for n in counts),
        workload=Workload(
            "ollama", args.kind, args.model or DEFAULT_MODEL, prompts, max_tokens=args.max_tokens
        ),
        mode="rate" if rate else "concurrency",
        levels=(rate or concurrency,),
        requests=args.requests,
        arrivals="poisson",
        seed=args.seed,
    )


def label(n: int, args: argparse.Namespace) -> str:
    return f"{n} x {profile_name(args)}"


def profile_name(args: argparse.Namespace) -> str:
    return Path(args.profile).stem if args.profile.endswith(".toml") else args.profile


def run(args: argparse.Namespace, counts: list[int], rate: float | None) -> Result:
    plan = workload_plan(args, counts, rate)
    fleets = {label(n, args): n for n in counts}
    sim = sim_config(args, int(args.num_parallel[0]))
    return simulate(plan, sim, fleets, routing=args.routing[0])


def meets(summary: Summary, target_p99: float) -> bool:
    """Served: nothing refused or timed out, and the p99 in bounds. A fleet too small for the
    arrival rate falls behind, and its queue shows in the p99 (over enough requests)."""
    return not summary.errors and summary.latency["p99"] <= target_p99


def fewest_instances(args: argparse.Namespace) -> tuple[int, Result] | None:
    """The smallest fleet that serves `--target-qps` arrivals under `--target-p99`."""
    for n in range(1, args.max_instances + 1):
        result = run(args, [n], args.target_qps)
        if meets(result.summaries()[0], args.target_p99):
            return n, result
    return None


@dataclass(frozen=True)
class Candidate:
    """A fleet to replay a trace on."""

    instances: int
    num_parallel: int
    routing: Policy
    warm: bool = False

    def label(self, profile: str) -> str:
        slots = f"{self.num_parallel} slot" + ("s" if self.num_parallel > 1 else "")
        warm = ", warm" if self.warm else ""
        return f"{self.instances} x {profile}, {slots}, {self.routing}{warm}"


def candidates(args: argparse.Namespace) -> list[Candidate]:
    """Every combination asked for, cheapest first: fewer instances, then fewer slots."""
    warm = {"no": [False], "yes": [True], "both": [False, True]}[args.warm]
    combos = itertools.product(args.instances, args.num_parallel, args.routing, warm)
    return sorted(
        dict.fromkeys(Candidate(int(n), int(p), r, w) for n, p, r, w in combos),
        key=lambda c: (c.instances, c.num_parallel),
    )


def replay(args: argparse.Namespace, trace: tuple[TracedRequest, ...]) -> Result:
    """The trace on each candidate fleet, on a virtual clock: one result, a setup a candidate,
    each summarised as it ends (a long trace's samples for every candidate would not fit)."""
    models = tuple(sorted({t.model for t in trace}))
    workload = Workload("ollama", "chat", models[0], trace=trace)
    plan = Plan((), workload, "replay", (args.speed,), seed=args.seed)
    setups: list[Setup] = []
    slices: list[Slice] = []
    summaries: list[Summary] = []
    for candidate in candidates(args):
        name = candidate.label(profile_name(args))
        one = replace(plan, setups=(Setup(name, "sim://"),))
        sim = sim_config(args, candidate.num_parallel, models)
        fleet = {name: candidate.instances}
        result = simulate(one, sim, fleet, routing=candidate.routing, warm=candidate.warm)
        setups += one.setups
        slices += result.slices
        summaries += result.summaries()  # and its samples go
    return Result(replace(plan, setups=tuple(setups)), slices=slices, summarized=summaries)


def cheapest(result: Result, target_p99: float) -> Summary | None:
    """The first candidate (they come cheapest first) that meets the target."""
    return next((s for s in result.summaries() if meets(s, target_p99)), None)


def replayed(args: argparse.Namespace) -> tuple[TracedRequest, ...]:
    """The trace file, or the ledger's answered requests since `--since`."""
    if args.replay != "ledger":
        try:
            return read_trace(Path(args.replay))
        except TraceError as exc:
            raise BenchError(str(exc)) from None
    since = time.time() - parse_age(args.since)
    store = open_store(database_of(args.config, flag=args.database))
    try:
        trace = from_ledger(store.answered(since, MAX_REQUESTS + 1))
    except TraceError as exc:
        raise BenchError(f"the ledger since {args.since}: {exc}") from None
    finally:
        store.close()
    if not trace:
        raise BenchError(f"no answered request in the ledger in the last {args.since}")
    return trace


AFFINITY = ("session-affinity", "prefix-affinity")  # they need prompts; a trace has none


def _check(args: argparse.Namespace) -> None:
    if args.load_seconds is not None and not 0 <= args.load_seconds < math.inf:
        raise BenchError("--load-seconds: a number of seconds from 0")
    loaded = 1 if args.max_loaded_models is None else args.max_loaded_models
    wholes = [*args.instances, *args.num_parallel, loaded]
    if args.requests < 1 or any(n != int(n) or n < 1 for n in wholes):
        raise BenchError(
            "--requests, --num-parallel, --instances and --max-loaded-models take positive "
            "whole numbers"
        )
    if args.replay:
        if args.target_qps is not None or args.rate or args.concurrency:
            raise BenchError("--replay sets the arrivals: no --rate, --concurrency, --target-qps")
        if not 0 < args.speed < math.inf:
            raise BenchError("--speed must be positive")
        if affinity := [p for p in args.routing if p in AFFINITY]:
            raise BenchError(
                f"--replay: {', '.join(affinity)} route by what prompts share, and a trace "
                "keeps no prompt (its replayed prompts share nothing): compare the others"
            )
        curve = len(timing(args).batch_curve)
        if curve and max(args.num_parallel) > curve:
            raise BenchError(
                f"the profile's batching was measured with up to {curve} at once: calibrate "
                f"with --num-parallel {int(max(args.num_parallel))} to plan that many slots"
            )
    elif args.calibrate or args.calibrate_from:
        return
    elif (args.target_qps is None) != (args.target_p99 is None):
        raise BenchError("--target-qps and --target-p99 go together")
    elif len(args.num_parallel) > 1 or len(args.routing) > 1:
        raise BenchError("lists of --num-parallel or --routing are candidates for --replay")


def plan_command(args: argparse.Namespace) -> int:
    _check(args)
    if args.calibrate or args.calibrate_from:
        from parallama.bench.calibration import calibrate_command

        return calibrate_command(args)
    text = sys.stderr if args.json == "-" else sys.stdout  # stdout: the JSON alone
    speed = timing(args).decode_tps
    if args.replay:
        trace = replayed(args)
        print(
            f"Replayed on a virtual clock{f' at {args.speed:g}x' if args.speed != 1 else ''}: "
            f"{len(trace)} requests over {trace[-1].time:.0f} s, on fleets of "
            f"{profile_name(args)} ({speed:g} tokens/s per sequence), behind parallama's "
            "scheduler",
            flush=True,
            file=text,
        )
        result = replay(args, trace)
        print(report.markdown(result, interleaved=False), file=text)
        payload = report.as_json(result)
        if args.target_p99 is not None:
            payload["needed"] = _tell_cheapest(result, args.target_p99, text)
    else:
        counts = [int(n) for n in args.instances]
        print(
            f"Simulated on a virtual clock: instances of {profile_name(args)} ({speed:g} "
            f"tokens/s per sequence, OLLAMA_NUM_PARALLEL={int(args.num_parallel[0])}), "
            "behind parallama's scheduler",
            flush=True,
            file=text,
        )
        result = run(args, counts, args.rate)
        print(report.markdown(result, interleaved=False), file=text)
        payload = report.as_json(result)
        if args.target_qps is not None:
            payload["needed"] = _tell_fewest(args, text)
    if args.json:
        data = orjson.dumps(payload, option=orjson.OPT_INDENT_2) + b"\n"
        if args.json == "-":
            sys.stdout.write(data.decode())
        else:
            Path(args.json).write_bytes(data)
    return 0


def _tell_cheapest(result: Result, target_p99: float, text: TextIO) -> dict[str, Any] | None:
    found = cheapest(result, target_p99)
    if found is None:
        print(f"\nNo candidate serves this traffic with p99 under {target_p99:g} s.", file=text)
        return None
    print(
        f"\nThe cheapest fleet with p99 under {target_p99:g} s and nothing refused: "
        f"{found.setup} (p50 {report.seconds(found.latency['p50'])}, p99 "
        f"{report.seconds(found.latency['p99'])}, TTFT p99 "
        f"{report.seconds(found.first_token['p99'])}, queue wait p99 "
        f"{report.seconds(found.queue_wait['p99'])}).",
        file=text,
    )
    return {"setup": found.setup, "summary": found.as_dict()}


def _tell_fewest(args: argparse.Namespace, text: TextIO) -> dict[str, Any] | None:
    found = fewest_instances(args)
    goal = f"{args.target_qps:g} requests/s with p99 under {args.target_p99:g} s"
    if found is None:
        print(f"\nNo fleet up to {args.max_instances} instances serves {goal}.", file=text)
        return None
    n, chosen = found
    s = chosen.summaries()[0]
    print(
        f"\n{goal}: {n} instance{'s' if n > 1 else ''} of {profile_name(args)} "
        f"(simulated over {s.requests} random arrivals: p50 "
        f"{report.seconds(s.latency['p50'])}, p99 {report.seconds(s.latency['p99'])}).",
        file=text,
    )
    return {"instances": n, "summary": s.as_dict()}
