"""`parallama` commands (and a redis-server) started by the benchmarks, each in a process of its
own (so that its CPU is not the load generator's), and stopped by its process id."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from parallama.launch.supervisor import free_port


@contextlib.contextmanager
def started(*args: str) -> Iterator[list[str]]:
    """`parallama ARGS` until it serves (it printed "Ctrl-C to stop"); the addresses it printed,
    first the one it listens on."""
    with started_process(*args) as (urls, _):
        yield urls


@contextlib.contextmanager
def started_process(*args: str, cpu: str | None = None) -> Iterator[tuple[list[str], int]]:
    """`started`, with the process id (for its CPU time); `cpu`: pinned to those CPUs."""
    pinned = ["taskset", "-c", cpu] if cpu is not None and shutil.which("taskset") else []
    process = subprocess.Popen(
        [*pinned, sys.executable, "-m", "parallama", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    try:
        urls: list[str] = []
        for line in process.stdout:
            urls += re.findall(r"http://127\.0\.0\.1:\d+", line)
            if "Ctrl-C" in line:
                break
        else:
            raise RuntimeError(f"parallama {args[0]} exited with {process.wait()}")
        yield urls, process.pid
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def redis() -> Iterator[tuple[str, int]]:
    """A redis-server on a free loopback port, in a scratch directory, saving nothing: its URL
    and process id."""
    port, folder = free_port("127.0.0.1"), tempfile.mkdtemp()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
