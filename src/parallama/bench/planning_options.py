"""The flags of `parallama plan` (apart from the simulation, so that other commands do not
load it)."""

from __future__ import annotations

import argparse
from typing import cast, get_args

from parallama.bench.options import numbers
from parallama.core.router import Policy
from parallama.sim.timing import PROFILES
from parallama.teams.options import add_database_arguments

DEFAULT_MODEL = "qwen2.5:7b"


def policies(text: str) -> list[Policy]:
    """A policy, or a list of them: `least-loaded,prefix-affinity`."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = get_args(Policy)
    wrong = [name for name in names if name not in known]
    if wrong or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: policies are {', '.join(known)}")
    return [cast(Policy, name) for name in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hardware = parser.add_argument_group("the servers")
    hardware.add_argument(
        "--profile",
        default="rtx4090",
        metavar="NAME|FILE.toml",
        help="hardware profile of each instance: "
        + ", ".join(sorted(PROFILES))
        + " (default: %(default)s), or a timing profile file (--calibrate writes one)",
    )
    hardware.add_argument(
        "--instances",
        type=numbers,
        default=[1, 2, 4],
        metavar="N[,N...]",
        help="instance counts to compare (default: 1,2,4)",
    )
    hardware.add_argument(
        "--num-parallel",
        type=numbers,
        default=[1],
        metavar="N[,N...]",
        help="OLLAMA_NUM_PARALLEL of each; a list compares them with --replay (default: 1)",
    )
    hardware.add_argument(
        "--load-seconds",
        type=float,
        help="model load time (default: 0, warm); --calibrate: the profile's, instead of "
        "measuring it (Ollama's API: the model is unloaded once, then loaded again)",
    )
    hardware.add_argument(
        "--max-loaded-models",
        type=int,
        help="OLLAMA_MAX_LOADED_MODELS of each (default: every model asked for fits)",
    )
    hardware.add_argument(
        "--routing",
        type=policies,
        default=["least-loaded"],
        metavar="POLICY[,POLICY...]",
        help="the gateway's policy: " + ", ".join(get_args(Policy)) + "; a list compares them "
        "with --replay (default: least-loaded)",
    )
    traffic = parser.add_argument_group("replayed traffic")
    traffic.add_argument(
        "--replay",
        metavar="TRACE.jsonl|ledger",
        help="the requests that came, replayed on each candidate (--instances x --num-parallel "
        "x --routing): a trace (parallama usage --trace writes one), or `ledger`: the usage "
        "ledger's answered requests since --since, from the gateway's database",
    )
    traffic.add_argument(
        "--since", default="7d", help="--replay ledger: how far back (default: %(default)s)"
    )
    traffic.add_argument(
        "--warm",
        choices=("no", "yes", "both"),
        default="no",
        help="--replay: every model kept loaded on every instance (the gateway's warm = true, "
        "keep_alive = -1), or engines that start empty and unload after Ollama's default 5 "
        "minutes idle; both: compare (default: no; loads cost --load-seconds)",
    )
    add_database_arguments(parser)  # --replay ledger: where the ledger is
    traffic.add_argument(
        "--speed", type=float, default=1.0, help="--replay: time runs this many times faster"
    )
    calibration = parser.add_argument_group("a profile measured on a real engine")
    calibration.add_argument(
        "--calibrate",
        metavar="URL",
        help="measure this engine (Ollama or OpenAI-compatible), or each engine serving behind "
        "this parallama gateway, and write its timing profile to --out (one per engine: "
        "--out's name with -1, -2 ...); then --profile FILE uses it",
    )
    calibration.add_argument(
        "--calibrate-from",
        metavar="BENCH.json",
        help="the same from a parallama bench --json report of one engine at concurrency "
        "levels 1, 2, ...",
    )
    calibration.add_argument(
        "--out", metavar="FILE.toml", default="profile.toml", help="default: %(default)s"
    )
    calibration.add_argument(
        "--api",
        choices=("ollama", "openai"),
        default="ollama",
        help="--calibrate: the engine's API (default: ollama)",
    )
    work = parser.add_argument_group("the workload (as parallama bench)")
    work.add_argument(
        "--model",
        help=f"default: {DEFAULT_MODEL}; --calibrate: the first the engine lists",
    )
    work.add_argument("--kind", choices=("chat", "generate"), default="chat")
    work.add_argument("--prompts", metavar="FILE", help="default: the seed's eight questions")
    work.add_argument(
        "--max-tokens", type=int, default=128, help="output tokens per answer (default: 128)"
    )
    work.add_argument(
        "--output-tokens",
        default="40-400",
        metavar="MIN-MAX",
        help="how long answers run when --max-tokens does not cut them (default: 40-400)",
    )
    mode = work.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=float, help="closed loop: N clients (default: 8)")
    mode.add_argument("--rate", type=float, help="open loop: requests/s arriving")
    work.add_argument("--requests", type=int, default=500, help="per setup (default: 500)")
    work.add_argument("--seed", type=int, default=0)
    goal = parser.add_argument_group("the goal")
    goal.add_argument("--target-qps", type=float, help="requests/s to serve")
    goal.add_argument("--target-p99", type=float, help="seconds the p99 latency may reach")
    goal.add_argument(
        "--max-instances", type=int, default=64, help="give up past this many (default: 64)"
    )
    parser.add_argument("--json", metavar="FILE", help="the results as JSON (- for stdout)")
