"""Options of `parallama serve` (the flag help is the reference documentation)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from parallama.core.scheduler import SchedulerSettings
from parallama.gateway.app import BackendConfig, Gateway, GatewayConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        action="append",
        required=True,
        metavar="URL",
        help="an Ollama (or emulated) server, e.g. http://127.0.0.1:11434; repeat for several",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=1,
        help="parallel slots per model on each backend: its OLLAMA_NUM_PARALLEL (default: 1)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=11500, help="port (default: %(default)s)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="waiting requests, all models (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue-per-model",
        type=int,
        default=512,
        help="waiting requests per model before 503 + Retry-After (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="seconds a request may wait for a slot before 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--discipline",
        choices=("fifo", "fair"),
        default="fifo",
        help="queue order: fifo (with X-Priority), or fair round-robin over clients "
        "(API key, X-Client-Id, else address) (default: %(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a backend may take for one answer before 504 (default: %(default)s)",
    )


def config_from(args: argparse.Namespace) -> GatewayConfig:
    if args.slots < 1 or args.max_queue < 1 or args.max_queue_per_model < 1:
        raise ValueError("--slots, --max-queue and --max-queue-per-model must be positive")
    return GatewayConfig(
        backends=tuple(BackendConfig(url, slots=args.slots) for url in args.backend),
        host=args.host,
        port=args.port,
        scheduler=SchedulerSettings(
            max_queue=args.max_queue,
            max_queue_per_model=args.max_queue_per_model,
            queue_timeout=args.queue_timeout,
            discipline="fair" if args.discipline == "fair" else "fifo",
        ),
        request_timeout=args.request_timeout,
    )


async def serve(config: GatewayConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config)
    await gateway.start()
    try:
        backends = ", ".join(b.url for b in config.backends)
        print(f"parallama serve: {gateway.url} -> {backends}\nCtrl-C to stop", flush=True)
        await stop.wait()
    finally:
        await gateway.stop()
