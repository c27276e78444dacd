"""`parallama plan`: how many instances of some hardware a workload needs, found by simulation
(`simulate.py`) rather than by buying the GPUs first.

It answers two questions: with 1, 2, 4 ... instances of this hardware profile, what QPS, latency
and time to first token does this workload get; and with `--target-qps` and `--target-p99`, the
fewest instances that serve that rate of arrivals with that p99 and no errors. The servers are
taken as warm (models loaded: the steady state), unless `--load-seconds` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import orjson

from parallama.bench import report
from parallama.bench.main import BenchError
from parallama.bench.runner import Plan, Result, Setup
from parallama.bench.simulate import simulate
from parallama.bench.stats import Summary
from parallama.bench.workload import SEED_QUESTIONS, PromptError, Workload, load_prompts
from parallama.errors import ConfigError
from parallama.sim.catalog import spec_for
from parallama.sim.config import SimConfig, parse_output_tokens
from parallama.sim.scheduler import OllamaSettings
from parallama.sim.timing import PROFILES


def sim_config(args: argparse.Namespace) -> SimConfig:
    timing = PROFILES[args.profile].timing
    try:
        output_tokens = parse_output_tokens(args.output_tokens)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    return SimConfig(
        models=(spec_for(args.model),),
        scheduler=OllamaSettings(num_parallel=args.num_parallel),
        timing=replace(timing, load_seconds=args.load_seconds),
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
        workload=Workload("ollama", args.kind, args.model, prompts, max_tokens=args.max_tokens),
        mode="rate" if rate else "concurrency",
        levels=(rate or concurrency,),
        requests=args.requests,
        arrivals="poisson",
        seed=args.seed,
    )


def label(n: int, args: argparse.Namespace) -> str:
    return f"{n} x {args.profile}"


def run(args: argparse.Namespace, counts: list[int], rate: float | None) -> Result:
    plan = workload_plan(args, counts, rate)
    fleets = {label(n, args): n for n in counts}
    return simulate(plan, sim_config(args), fleets, routing=args.routing)


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


def plan_command(args: argparse.Namespace) -> int:
    if (args.target_qps is None) != (args.target_p99 is None):
        raise BenchError("--target-qps and --target-p99 go together")
    if args.requests < 1 or args.num_parallel < 1 or any(n != int(n) for n in args.instances):
        raise BenchError("--requests, --num-parallel and --instances take positive whole numbers")
    counts = [int(n) for n in args.instances]
    timing = PROFILES[args.profile].timing
    text = sys.stderr if args.json == "-" else sys.stdout  # stdout: the JSON alone
    print(
        f"Simulated on a virtual clock: instances of {args.profile} ({timing.decode_tps:g} "
        f"tokens/s per sequence, OLLAMA_NUM_PARALLEL={args.num_parallel}), "
        "behind parallama's scheduler",
        flush=True,
        file=text,
    )
    result = run(args, counts, args.rate)
    print(report.markdown(result, interleaved=False), file=text)
    payload = report.as_json(result)
    if args.target_qps is not None:
        found = fewest_instances(args)
        goal = f"{args.target_qps:g} requests/s with p99 under {args.target_p99:g} s"
        if found is None:
            print(f"\nNo fleet up to {args.max_instances} instances serves {goal}.", file=text)
            payload["needed"] = None
        else:
            n, chosen = found
            s = chosen.summaries()[0]
            print(
                f"\n{goal}: {n} instance{'s' if n > 1 else ''} of {args.profile} "
                f"(simulated over {s.requests} random arrivals: p50 "
                f"{report.seconds(s.latency['p50'])}, p99 {report.seconds(s.latency['p99'])}).",
                file=text,
            )
            payload["needed"] = {"instances": n, "summary": s.as_dict()}
    if args.json:
        data = orjson.dumps(payload, option=orjson.OPT_INDENT_2) + b"\n"
        if args.json == "-":
            sys.stdout.write(data.decode())
        else:
            Path(args.json).write_bytes(data)
    return 0
