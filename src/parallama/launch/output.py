"""What an engine prints: kept out of parallama's console, where two llama.cpp servers alone
printed some 4,700 lines at start, and written as it comes to the instance's own log file.

The file is appended to across runs and restarts (a marker line says where each run begins and
how it ended) and bounded: past `MAX_LOG_BYTES` it becomes `<file>.1` (replacing the previous
one) and a new file begins. Each line is also logged at debug level under `parallama.engine`
(`--log-level debug` shows it), and the last lines are kept for the error that says why an
engine did not start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

output_log = logging.getLogger("parallama.engine")

LAST_LINES = 20  # kept for the error that says why an engine did not start
MAX_LINE = 4096  # longer lines are cut, in the debug log and the last lines (not in the file)
MAX_LOG_BYTES = 10 * 1024 * 1024


class EngineOutput:
    """One instance's output, over all the runs of its engine."""

    def __init__(self, name: str, path: Path | None, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.last: deque[str] = deque(maxlen=LAST_LINES)
        self._file: BinaryIO | None = None
        self._size = 0
        self._failing = False  # writing failed, and was said once

    def open(self) -> None:
        """Open the file to append to, making its directory if missing (OSError if it cannot
        be written): before the engine starts, so that nothing runs unrecorded."""
        if self.path is not None and self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()

    def begin(self, pid: int) -> None:
        """A new run: its marker in the file, and the last lines are its own from now."""
        self.last.clear()
        self._note(f"started, pid {pid}")

    def end(self, how: str) -> None:
        """The run is over (`how`: "exit code 0", "signal SIGSEGV (exit -11)", ...)."""
        self._note(f"ended: {how}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def read(self, stream: asyncio.StreamReader) -> None:
        """The engine's stdout and stderr until it closes them: to the file as they come, one
        debug log line per line."""
        pending = b""
        while chunk := await stream.read(65536):
            self._write(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_LINE:
                lines.append(pending)
                pending = b""
            for line in lines:
                self._line(line)
        if pending:
            self._line(pending)

    def last_words(self) -> str:
        where = f" (all of it in {self.path})" if self.path is not None else ""
        if not self.last:
            return f"it printed nothing{where}"
        return f"its last output{where}:\n    " + "\n    ".join(self.last)

    def _line(self, raw: bytes) -> None:
        line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip()
        if line:
            self.last.append(line)
            if output_log.isEnabledFor(logging.DEBUG):
                output_log.debug(line, extra={"fields": {"instance": self.name}})

    def _note(self, event: str) -> None:
        moment = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write(f"--- parallama: {self.name} {event} at {moment} ---\n".encode())

    def _write(self, data: bytes) -> None:
        """Append to the file, flushed at once (someone may be following it with `tail -f`)."""
        if self._file is None:
            return
        try:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            if self._file is not None:
                self._file.write(data)
                self._file.flush()
        except OSError as exc:  # a full disk: the engine keeps running, its output is lost
            if not self._failing:
                output_log.warning(
                    "engine log not written",
                    extra={"fields": {"instance": self.name, "error": exc.strerror}},
                )
            self._failing = True
            return
        self._failing = False
        self._size += len(data)

    def _rotate(self) -> None:
        """The file so far becomes `<file>.1`, replacing the one before."""
        assert self._file is not None and self.path is not None
        self._file.close()
        self._file = None  # stays so if the new file cannot be opened: the output is dropped
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._file = self.path.open("ab")
        self._size = 0
