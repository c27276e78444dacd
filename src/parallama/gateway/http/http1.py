"""HTTP/1.1 as the gateway writes and reads it, without I/O: the heads it writes (a request to a
backend, an answer to a client) and a backend's answer, parsed as its bytes arrive (httptools:
llhttp, Node's C parser). The server (`server.py`) and the upstream client (`upstream.py`) put
them on sockets.
"""

from __future__ import annotations

import email.utils
import http
import time
from collections import deque

import httptools
import orjson

Headers = list[tuple[bytes, bytes]]

_STATUS_LINES = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus
}
# A body this small goes out with its head as one piece: one small write costs less than a
# gathered one, and a big one is not worth copying.
JOIN_BELOW = 64 * 1024
# Statuses whose answers never have a body, whatever their headers say.
BODYLESS = frozenset({204, 304})


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


class _Date:
    second = 0
    header = b""


def date_header() -> bytes:
    """The Date header of an answer, formatted once a second."""
    second = int(time.time())
    if second != _Date.second:
        _Date.second = second
        _Date.header = b"Date: %s\r\n" % email.utils.formatdate(second, usegmt=True).encode()
    return _Date.header


def error_answer(status: int, message: str, headers: bytes = b"") -> bytes:
    """A whole answer that closes the connection, with Ollama's `{"error": ...}` body: for
    faults found before a request's route is known (its head is bad, late or too large; too
    many connections)."""
    body = orjson.dumps({"error": message})
    return b"%s%sContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        status_line(status),
        date_header(),
        len(body),
        b"Connection: close\r\n",
        headers,
        body,
    )


def request_head(method: bytes, target: bytes, host: bytes, headers: Headers, length: int) -> bytes:
    """A request's head for a backend: `headers` must not include Host, Content-Length or
    hop-by-hop headers, which are the connection's own (set here, or left out)."""
    fields = b"".join([b"%s: %s\r\n" % pair for pair in headers])
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
        method,
        target,
        host,
        fields,
        length,
    )


class ProtocolError(Exception):
    """The backend broke HTTP/1.1; the message says how."""


class AnswerReader:
    """One answer at a time from a backend's bytes: its status and headers, then its body in
    the pieces it came in. `reset` before each request on a kept-alive connection."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.keep_alive_timeout: int | None = None  # `Keep-Alive: timeout=N`, where told
        self._framed = False  # Content-Length or chunked: else the body ends when the socket does
        self._chunks: deque[bytes] = deque()
        self.buffered = 0  # body bytes received and not yet taken

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            raise ProtocolError(str(exc.__context__ or exc)) from None
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise ProtocolError(f"sent invalid HTTP: {exc}") from None

    def take(self) -> bytes | None:
        """The next piece of the body received, if any."""
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        return chunk

    def take_all(self) -> bytes | None:
        """All the pieces of the body received and not yet taken, as one (what one read of
        the socket brought: a stream behind schedule may bring several chunks at once)."""
        chunks = self._chunks
        if not chunks:
            return None
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        return data

    def connection_ended(self) -> bool:
        """The connection closed: whether that completed the answer (a body without framing
        ends where the connection does)."""
        if self.head_done and not self.complete and not self._framed:
            self.complete = True
        return self.complete

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # raising here makes feed_data raise
            raise ProtocolError("sent bytes after its answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True
        elif lowered == b"keep-alive":  # RFC 9110's hint, which llama-server and Node send
            for param in value.split(b","):
                key, _, number = param.strip().partition(b"=")
                if key.lower() == b"timeout" and number.isdigit():
                    self.keep_alive_timeout = int(number)

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = True
        if self.status in BODYLESS:
            self._framed = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
