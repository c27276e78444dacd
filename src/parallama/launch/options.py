"""The flags of `parallama up` (kept apart from the launcher so that `parallama --help` and the
other commands do not load it)."""

from __future__ import annotations

import argparse
from typing import get_args

from parallama import config
from parallama.launch.engines import Engine

DEFAULT_BASE_PORT = 11434  # Ollama's, for --instances


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        help="where each engine's output goes, in NAME.log (default: "
        "$XDG_STATE_HOME/parallama/logs, else ~/.local/state/parallama/logs)",
    )
    group = parser.add_argument_group(
        "instances (instead of the file's [[instances]] tables)",
        "N alike engines on consecutive ports from --base-port.",
    )
    group.add_argument("--instances", type=int, metavar="N", help="how many engines to start")
    group.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="instead of --instances: from MIN to MAX engines, started while requests wait and "
        "stopped when idle (tune it in the file's [instances.autoscale])",
    )
    group.add_argument(
        "--engine",
        choices=get_args(Engine),
        default="ollama",
        help="what each runs: ollama serve, the emulator, llama.cpp's llama-server, or "
        "--command (default: %(default)s)",
    )
    group.add_argument(
        "--base-port",
        type=int,
        help=f"the first engine's port; 0: free ports (default: {DEFAULT_BASE_PORT} for "
        "--instances, free ports for --demo-real)",
    )
    group.add_argument(
        "--command",
        dest="engine_command",
        help="the program and arguments to run instead of the engine's own",
    )
    group.add_argument("--num-parallel", type=int, help="OLLAMA_NUM_PARALLEL of each")
    group.add_argument("--keep-alive", help="OLLAMA_KEEP_ALIVE of each, e.g. -1 or 5m")
    group.add_argument(
        "--gpus", type=int, default=0, help="give instance i GPU i %% GPUS (CUDA_VISIBLE_DEVICES)"
    )
    group.add_argument("--model", help="llama-server: the GGUF file")
    group.add_argument("--alias", help="llama-server: the model's name for clients")
    group.add_argument("--threads", type=int, help="llama-server: threads of each")
    group.add_argument("--parallel", type=int, help="llama-server: slots of each (default 4)")
    group.add_argument(
        "--demo-real",
        action="store_true",
        help="two llama-servers with SmolLM2-135M, one thread each: a real model on any CPU "
        "(the model is fetched and llama-server built once, if need be)",
    )
    parser.add_argument(
        "--llama-server",
        metavar="PROGRAM",
        help="the llama-server to run (default: the file's llama_server, else the one on PATH, "
        "else one built from source once and cached)",
    )
