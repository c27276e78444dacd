"""`parallama` commands as a user runs them: real processes, started with their flags, read
from their output, signalled, and checked for leftovers."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_LINE = "Ctrl-C to stop everything"


@dataclass
class Up:
    process: subprocess.Popen[str]
    url: str
    output: list[str]  # its standard output so far
    log: Path  # its standard error: parallama's log lines
    log_dir: Path  # the engines' log files


def engine_log_dir(log: Path) -> Path:
    """Where a test's engines write their output: beside its other files, never in $HOME."""
    return log.parent / "engine-logs"


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def running_up(
    *args: str, log: Path, ready_within: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[Up]:
    """`parallama up ARGS` until it printed that everything serves; SIGTERM at the end. The
    engines' log files go to `engine_log_dir(log)` unless ARGS say where."""
    log_dir = engine_log_dir(log)
    if "--log-dir" not in args:
        args = ("--log-dir", str(log_dir), *args)
    else:
        log_dir = Path(args[args.index("--log-dir") + 1])
    process = subprocess.Popen(
        [sys.executable, "-m", "parallama", "up", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=os.environ | (env or {}),
    )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: object) -> None:
        for line in process.stdout or ():
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, args=(process.stdout,), daemon=True).start()
    output: list[str] = []
    try:
        while not output or output[-1] != READY_LINE:
            line = lines.get(timeout=ready_within)
            if line is None:
                raise AssertionError(
                    f"parallama up ended (code {process.wait()}) before it served:\n"
                    + "\n".join(output)
                    + "\n"
                    + log.read_text()[-3000:]
                )
            output.append(line)
        found = re.search(r"gateway on (http://\S+)", "\n".join(output))
        assert found, output
        yield Up(process, found.group(1), output, log, log_dir)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def finished(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`parallama ARGS` run to its end: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "parallama", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def up_until_it_ends(*args: str, log_dir: Path) -> subprocess.CompletedProcess[str]:
    """`parallama up ARGS` that is expected to give up, its engines' log files in `log_dir`."""
    return finished("up", "--log-dir", str(log_dir), *args, timeout=30)


@contextmanager
def sim_process(
    *args: str,
    env: dict[str, str] | None = None,
    command: str = "sim",
    printed: list[str] | None = None,
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start `parallama sim` (or another command), wait until it has printed its addresses and
    "Ctrl-C", stop it at the end. The gateway's address comes first; `printed` collects the
    lines read."""
    process = subprocess.Popen(
        [sys.executable, "-m", "parallama", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    urls: list[str] = []
    try:
        for line in process.stdout:
            if printed is not None:
                printed.append(line.rstrip("\n"))
            found = re.match(r"(?:\s+|parallama \w+: gateway on )(http://127\.0\.0\.1:\d+)", line)
            if found:
                urls.append(found.group(1))
            if "Ctrl-C" in line:
                break
        else:
            raise AssertionError(f"parallama sim exited early with {process.wait()}")
        yield process, urls
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
