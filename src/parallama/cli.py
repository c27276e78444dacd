"""The `parallama` command: thin argument parsing that hands over to the modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from parallama import __version__, config, logs
from parallama.bench.options import add_arguments as bench_arguments
from parallama.bench.planning_options import add_arguments as plan_arguments
from parallama.errors import ConfigError, ParallamaError
from parallama.launch.options import add_arguments as up_arguments
from parallama.runtime import run
from parallama.sim import config as sim_config
from parallama.sim.timing import PROFILES
from parallama.teams_cli import add_keys_arguments as keys_arguments
from parallama.teams_cli import add_usage_arguments as usage_arguments


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
        "GET /parallama/status shows the counters, GET /metrics the Prometheus metrics. "
        "Each setting comes from its flag, else PARALLAMA_<SETTING>, else the --config file, "
        "else its default.",
    )
    config.add_arguments(serve)
    up = commands.add_parser(
        "up",
        help="start several engines (ollama serve, llama.cpp, the emulator) behind the gateway",
        description="Start the engine processes of the --config file's [[instances]] tables (or "
        "--instances N alike ones, or --demo-real), wait until each serves, then run the gateway "
        "in front of them. A crashed engine is restarted with backoff; its output is logged "
        "under its name; Ctrl-C or SIGTERM stops the gateway, then every engine. The gateway's "
        "settings are those of `parallama serve`.",
    )
    up_arguments(up)
    llama = commands.add_parser(
        "llama-server",
        help="find llama.cpp's llama-server, or build it once from source; print its path",
        description="The llama-server that `parallama up` runs: the one on PATH, else the build "
        "cached in ~/.cache/parallama, else one built now (portable: no AVX-512 or AMX code) "
        "from the llama.cpp that llama-cpp-python's sdist vendors, fetched with pip.",
    )
    llama.add_argument(
        "--smollm2",
        action="store_true",
        help="also fetch SmolLM2-135M-Instruct (the demo's model) and print its path",
    )
    bench = commands.add_parser(
        "bench",
        help="measure P50/p99 latency, QPS, tokens/s and time to first token of servers",
        description="A load generator for Ollama-API and OpenAI-API servers: closed loop "
        "(--concurrency) or open loop (--rate), one level or a sweep. Several targets are "
        "measured interleaved in one run and compared; prints the seed's table (P50 latency, "
        "QPS, tokens/s) with p99 and time to first token.",
    )
    bench_arguments(bench)
    plan = commands.add_parser(
        "plan",
        help="how many instances a workload needs: simulated, no GPU and no waiting",
        description="Capacity planning: the benchmark's workload against N emulated servers of "
        "a hardware profile behind parallama's scheduler, simulated on a virtual clock (the "
        "emulator's and the gateway's own code, without sockets). Prints the bench table per "
        "instance count and, with --target-qps and --target-p99, the fewest instances needed.",
    )
    plan_arguments(plan)
    keys = commands.add_parser(
        "keys",
        help="API keys: create, list, show, update, revoke",
        description='API keys for `auth = "keys"`, kept in the gateway\'s database (found '
        "as `parallama serve` finds it). A new key is printed once; only its hash is stored.",
    )
    keys_arguments(keys)
    usage = commands.add_parser(
        "usage",
        help="who used what: the usage ledger summed",
        description="Requests, tokens and times from the usage ledger, grouped as asked.",
    )
    usage_arguments(usage)
    demo = commands.add_parser(
        "demo",
        help="try the gateway with emulated backends (no GPU, no Ollama)",
        description="Two emulated Ollama servers and the gateway in front of them, in one "
        "process; prints where to send requests. Ctrl-C stops everything.",
    )
    demo.add_argument(
        "--port", type=int, default=11500, help="the gateway's port (default: %(default)s)"
    )
    demo.add_argument(
        "--backends", type=int, default=2, help="emulated servers (default: %(default)s)"
    )
    demo.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="rtx4090",
        help="the emulated hardware (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, sys.argv[1:] if argv is None else list(argv))
    except ParallamaError as exc:  # bad settings (2), an engine that will not start (1), ...
        print(f"parallama {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:  # e.g. the port is taken
        print(f"parallama {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """The command, to its end; its exit status. `argv`: the arguments it was given (the
    workers of `serve --workers N` are started with them again)."""
    if args.command == "sim":
        from parallama.sim.run import serve_until_stopped

        run(serve_until_stopped(sim_config.from_args(args)))
    elif args.command == "serve":
        from parallama.gateway import workers
        from parallama.gateway.run import serve

        settings = config.from_args(args)
        logs.setup(settings.log_format, settings.log_level)
        workers.check(settings)
        if settings.workers > 1 and workers.worker_index() is None:
            return workers.run_workers(settings, argv)
        run(serve(settings, lambda: config.from_args(args)))
    elif args.command == "up":
        from parallama.launch.up import plan, run_up

        settings, launches = plan(args)
        logs.setup(settings.log_format, settings.log_level)
        run(run_up(settings, launches))
    elif args.command == "llama-server":
        from parallama.launch.llama_build import ensure_llama_server, ensure_smollm2

        print(ensure_llama_server())
        if args.smollm2:
            print(ensure_smollm2())
    elif args.command == "bench":
        from parallama.bench.main import run_bench

        return run_bench(args)
    elif args.command == "plan":
        from parallama.bench.planning import plan_command

        return plan_command(args)
    elif args.command == "keys":
        from parallama.teams_cli import run_keys

        return run_keys(args)
    elif args.command == "usage":
        from parallama.teams_cli import run_usage

        return run_usage(args)
    elif args.command == "demo":
        from parallama.demo import run_demo

        if args.backends < 1 or not 0 <= args.port <= 65535:
            raise ConfigError("--backends must be positive and --port a port number")
        logs.setup()
        run(run_demo(args.port, args.backends, args.profile))
    return 0
