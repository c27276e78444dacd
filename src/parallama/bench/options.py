"""The flags of `parallama bench` (apart from the load generator, so that the other commands do
not load it)."""

from __future__ import annotations

import argparse
import math
import os
from typing import get_args

from parallama.bench.workload import Api, Kind


def numbers(text: str) -> list[float]:
    """A level or a sweep: `8`, or `1,2,4,8`."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a list of numbers") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="base URL of an Ollama or OpenAI-compatible server (the gateway, an emulator, an "
        "engine), optionally labelled: direct=http://127.0.0.1:11434",
    )
    what = parser.add_argument_group("what to ask")
    what.add_argument("--api", choices=get_args(Api), default="ollama", help="default: ollama")
    what.add_argument("--kind", choices=get_args(Kind), default="chat", help="default: chat")
    what.add_argument("--model", help="default: the first one the first target lists")
    what.add_argument(
        "--api-key",
        default=os.environ.get("PARALLAMA_API_KEY") or None,
        help="sent as Authorization: Bearer, for a gateway with auth = keys "
        "(default: env PARALLAMA_API_KEY)",
    )
    what.add_argument(
        "--prompts",
        metavar="FILE",
        help="one prompt per line, or JSON Lines (.jsonl) with "
        '"prompt" (default: the seed\'s eight questions)',
    )
    what.add_argument(
        "--max-tokens", type=int, default=128, help="output tokens per answer (default: 128)"
    )
    what.add_argument(
        "--no-stream", dest="stream", action="store_false", help="ask for whole answers"
    )
    load = parser.add_argument_group("how much load")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=numbers,
        metavar="N[,N...]",
        help="closed loop: N clients, each sending its next request when the last is answered; "
        "a list sweeps (default: 4)",
    )
    mode.add_argument(
        "--rate",
        type=numbers,
        metavar="R[,R...]",
        help="open loop: R requests/s arrive whatever happens to earlier ones; a list sweeps",
    )
    load.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        help="coding-agent sessions per target: a shared system prompt with tools, each turn "
        "the last answer and a tool result appended; they arrive at --rate per second "
        "(default: 1)",
    )
    load.add_argument(
        "--turns", type=int, default=5, help="--sessions: requests per session (default: 5)"
    )
    load.add_argument(
        "--system-tokens",
        type=int,
        default=2000,
        help="--sessions: the system prompt's length (default: 2000)",
    )
    load.add_argument(
        "--tool-tokens",
        type=int,
        default=150,
        help="--sessions: each tool result's length (default: 150)",
    )
    mode.add_argument(
        "--replay",
        metavar="TRACE.jsonl",
        help="the requests of a trace (parallama usage --trace writes one), each at its time, "
        "with prompts and answers of its lengths; --model sends them all to one model",
    )
    load.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="--replay: time runs this many times faster (default: 1)",
    )
    load.add_argument(
        "--arrivals",
        choices=("poisson", "constant"),
        default="poisson",
        help="open loop: random (Poisson) or evenly spaced arrivals (default: poisson)",
    )
    load.add_argument(
        "--requests", type=int, help="per target and level (default: 32, unless --duration)"
    )
    load.add_argument("--duration", type=float, help="seconds per target and level")
    load.add_argument(
        "--rounds",
        type=int,
        help="slices each target's share is cut into, interleaved with the other targets' "
        "(default: 4 with several targets, else 1)",
    )
    load.add_argument(
        "--warmup", type=int, default=1, help="unmeasured requests per target first (default: 1)"
    )
    load.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request (default: 300)"
    )
    load.add_argument("--seed", type=int, default=0, help="for Poisson arrivals (default: 0)")
    load.add_argument(
        "--compare-pooling",
        action="store_true",
        help="the seed's experiment, on one target: a new TCP connection for every request "
        "against a keep-alive pool, interleaved in one run",
    )
    out = parser.add_argument_group("results")
    out.add_argument("--json", metavar="FILE", help="the results as JSON (- for standard output)")
    out.add_argument("--plot", metavar="FILE.png", help="latency CDF; for a sweep, QPS and latency")
    out.add_argument(
        "--max-error-rate",
        type=float,
        metavar="F",
        help="exit with status 1 if any target's share of failed requests is above F (0..1)",
    )
