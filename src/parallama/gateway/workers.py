"""`parallama serve --workers N`: N gateway processes on one port, for more cores.

Each worker is a whole gateway (`parallama serve` run again, told by `PARALLAMA_WORKER` which
one it is), listening with SO_REUSEPORT, so the kernel spreads new connections over them. They
share the backends' slots through the configured Redis (`state`): without it each worker would
believe it owns every slot, and N workers would send N times what a backend runs. This process
only starts them, restarts one that dies (after a second), and on Ctrl-C or SIGTERM stops
them all by their process ids. A worker dies with it (the parent-death signal).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from parallama.config import GatewaySettings
from parallama.errors import ConfigError

log = logging.getLogger("parallama.workers")
WORKER_ENV = "PARALLAMA_WORKER"
_PR_SET_PDEATHSIG = 1
_RESTART_SECONDS = 1.0
_STOP_SECONDS = 15.0


def worker_index() -> int | None:
    """Which worker this process is, or None for the one that starts them."""
    raw = os.environ.get(WORKER_ENV, "")
    return int(raw) if raw.isdigit() else None


def check(settings: GatewaySettings) -> None:
    if settings.workers > 1 and settings.state == "memory":
        raise ConfigError(
            f'workers = {settings.workers} needs state = "redis://...": each worker is a '
            "gateway of its own, and without shared slots each would send a backend as many "
            "requests as it has slots (start redis-server and name it in --state)"
        )
    if settings.workers > 1 and settings.port == 0:
        raise ConfigError("workers > 1 need a port of their own to share: set --port")


def run_workers(settings: GatewaySettings, argv: Sequence[str]) -> int:
    """Start `settings.workers` workers running `parallama ARGV`; until a signal."""
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    workers: dict[int, subprocess.Popen[bytes]] = {}

    def reload(signum: int, frame: FrameType | None) -> None:
        for worker in workers.values():  # each reads the settings again
            if worker.poll() is None:
                worker.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGHUP, reload)
    workers.update({index: _start(index, argv) for index in range(settings.workers)})
    print(
        f"parallama serve: {settings.workers} workers on http://{settings.host}:{settings.port}"
        f" (pids {', '.join(str(w.pid) for w in workers.values())}), sharing slots through "
        f"{settings.state}",
        flush=True,
    )
    while not stopping:
        time.sleep(0.2)
        for index, worker in list(workers.items()):
            if worker.poll() is not None and not stopping:
                log.error(
                    "worker died; restarting it",
                    extra={"fields": {"worker": index, "status": worker.returncode}},
                )
                time.sleep(_RESTART_SECONDS)
                workers[index] = _start(index, argv)
    for worker in workers.values():
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_SECONDS
    for worker in workers.values():
        try:
            worker.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return 0


def _start(index: int, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "parallama", *argv],
        env={**os.environ, WORKER_ENV: str(index)},
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (only prctl, before exec)
    )


def _die_with_parent() -> None:
    """SIGTERM when the process that started it dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
