"""The flags of `parallama plan` (apart from the simulation, so that other commands do not
load it)."""

from __future__ import annotations

import argparse
from typing import get_args

from parallama.bench.options import numbers
from parallama.core.router import Policy
from parallama.sim.timing import PROFILES

DEFAULT_MODEL = "qwen2.5:7b"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hardware = parser.add_argument_group("the servers")
    hardware.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="rtx4090",
        help="hardware profile of each instance (default: %(default)s)",
    )
    hardware.add_argument(
        "--instances",
        type=numbers,
        default=[1, 2, 4],
        metavar="N[,N...]",
        help="instance counts to compare (default: 1,2,4)",
    )
    hardware.add_argument(
        "--num-parallel", type=int, default=1, help="OLLAMA_NUM_PARALLEL of each (default: 1)"
    )
    hardware.add_argument(
        "--load-seconds", type=float, default=0.0, help="model load time (default: 0, warm)"
    )
    hardware.add_argument(
        "--routing",
        choices=get_args(Policy),
        default="least-loaded",
        help="the gateway's policy (default: %(default)s)",
    )
    work = parser.add_argument_group("the workload (as parallama bench)")
    work.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
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
