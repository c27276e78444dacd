"""Server-sent events (sans-I/O): framing events, and reading them back from bytes that arrive
cut anywhere.

The OpenAI dialect sends `data: {json}` events; the Anthropic Messages API and OpenAI's
Responses API name each one (`event: message_start`). Both SDKs skip comment lines (`: ...`),
which is how a waiting stream can say it is alive without an event of its own.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_EVENT_BYTES = 16 * 1024 * 1024  # one event's bytes at most: an engine cannot grow a reader


class EventTooLarge(ValueError):
    """An event (or a line without its end) longer than `MAX_EVENT_BYTES`."""


def named_event(name: str, payload: Any) -> bytes:
    """`event: name` with its JSON data, as Anthropic's and the Responses API's streams send."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def comment(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


class EventReader:
    """Bytes in, whole events out: `(name, data)` with `name` empty when the event had none."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._pending = b""
        self._name = b""
        self._data: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        self._pending += chunk
        events = []
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if not line:  # a blank line ends an event
                if self._data:
                    events.append((self._name, b"\n".join(self._data)))
                self._name, self._data, self._size = b"", [], 0
            elif line.startswith(b"data:"):
                self._data.append(line[5:].removeprefix(b" "))
                self._size += len(line)
            elif line.startswith(b"event:"):
                self._name = line[6:].strip()
            # else: a comment (`:`), an `id:` or `retry:` field, or noise: nothing for us
        if self._size + len(self._pending) > self._limit:
            raise EventTooLarge(f"an event of more than {self._limit} bytes")
        return events
