"""`parallama` commands started by the benchmarks, each in a process of its own (so that its CPU
is not the load generator's), and stopped by its process id."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def started(*args: str) -> Iterator[list[str]]:
    """`parallama ARGS` until it serves (it printed "Ctrl-C to stop"); the addresses it printed,
    first the one it listens on."""
    process = subprocess.Popen(
        [sys.executable, "-m", "parallama", *args],
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
        yield urls
    finally:
        process.terminate()
        process.wait(30)
