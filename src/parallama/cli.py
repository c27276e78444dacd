"""The `parallama` command: thin argument parsing that hands over to the modules."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from parallama import __version__
from parallama.gateway import cli as gateway_cli
from parallama.sim import config as sim_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallama",
        description="Concurrency and throughput layer for local LLM serving.",
    )
    parser.add_argument("--version", action="version", version=f"parallama {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = commands.add_parser(
        "sim",
        help="run emulated Ollama servers (no GPU needed)",
        description="Emulated Ollama servers that behave like `ollama serve` where concurrency is "
        "concerned: per-model parallel slots, a bounded pending queue answering 503 'server busy', "
        "model loading, keep-alive and eviction, with realistic timing. Settings come from the "
        "flags, else from the same OLLAMA_* environment variables Ollama reads.",
        epilog="Not Ollama: GET /_sim/state shows the scheduler's inside (queue, slots, "
        "connections accepted).",
    )
    sim_config.add_arguments(sim)
    serve = commands.add_parser(
        "serve",
        help="run the gateway in front of Ollama servers",
        description="A gateway speaking the Ollama and OpenAI APIs on one address: requests wait "
        "in its queue and are sent to whichever backend frees a slot first. "
        "GET /parallama/status shows the counters.",
    )
    gateway_cli.add_arguments(serve)
    return parser


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it is on Linux and macOS), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sim":
        from parallama.sim.run import serve_until_stopped

        try:
            config = sim_config.from_args(args)
        except sim_config.ConfigError as exc:
            parser.exit(2, f"parallama sim: error: {exc}\n")
        try:
            _run(serve_until_stopped(config))
        except OSError as exc:
            print(f"parallama sim: {exc}", file=sys.stderr)
            return 1
    if args.command == "serve":
        try:
            gateway_config = gateway_cli.config_from(args)
        except ValueError as exc:
            parser.exit(2, f"parallama serve: error: {exc}\n")
        try:
            _run(gateway_cli.serve(gateway_config))
        except OSError as exc:
            print(f"parallama serve: {exc}", file=sys.stderr)
            return 1
    return 0
