"""Fuzzing what clients send, for a bounded number of examples: the HTTP/1.1 server over real
sockets (heads, framing and bodies of every shape), and the request inspection and translations
directly (JSON shaped like the APIs' requests). Whatever comes, the gateway answers in HTTP
with a status it means (never a 500, never a hang) or closes the connection, logs no unhandled
error, and goes on serving; inspection and translation refuse with a 4xx `ApiError`, nothing
else. What the fuzzer found is kept below as `@example`s."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parallama.config import BackendSettings
from parallama.errors import ApiError
from parallama.gateway.app import Gateway
from parallama.protocol import anthropic, responses
from parallama.protocol.inspect import STREAM_DEFAULTS, inspect_request
from parallama.protocol.translate import ollama_request
from parallama.sim.server import SimServer
from tests.simhelpers import CHAT_MODEL, gateway_with

FUZZ = settings(
    max_examples=int(os.environ.get("PARALLAMA_FUZZ_EXAMPLES", "250")),  # more, for a long hunt
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow],
)

# -- request bodies shaped like the APIs' ------------------------------------------------------

FIELDS = (
    *("model", "messages", "prompt", "input", "system", "tools", "think", "options", "stream"),
    *("format", "images", "max_tokens", "thinking", "instructions", "keep_alive", "suffix"),
    *("raw", "tool_choice", "stop", "temperature", "max_output_tokens", "name", "dimensions"),
)
INNER = (
    *("role", "content", "type", "tool_calls", "function", "arguments", "images", "thinking"),
    *("text", "source", "data", "media_type", "id", "tool_use_id", "call_id", "output"),
    *("name", "input", "budget_tokens", "image_url", "url", "num_predict", "num_ctx"),
)
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer", "", "x"])
KINDS = st.sampled_from(
    [
        "text",
        "image",
        "tool_use",
        "tool_result",
        "thinking",
        "message",
        "function_call",
        "function_call_output",
        "input_text",
        "input_image",
        "reasoning",
        "enabled",
        "",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.floats()
    | st.text(max_size=40)
    | ROLES
    | KINDS
    | st.just(CHAT_MODEL)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(INNER) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=24,
)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8)


def refused_or_done(call: Any) -> None:
    """`call` returns, or refuses with a 4xx and a message of bounded length."""
    refusal: ApiError | None = None
    try:
        call()
    except ApiError as refused:
        refusal = refused
    if refusal is not None:
        assert 400 <= refusal.status < 500, refusal.message
        assert len(refusal.message) < 2000


@FUZZ
@given(st.sampled_from(sorted(STREAM_DEFAULTS)), BODIES)
@example("/api/chat", {"model": "m", "messages": [{"role": "assistant", "thinking": 1}]})
def test_inspection_refuses_in_4xx_or_reads_the_request(path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()  # big integers and NaN too, as clients send them
    refused_or_done(lambda: inspect_request(path, raw, {}, "127.0.0.1"))


@FUZZ
@given(st.sampled_from(["/api/chat", "/api/generate", "/api/embed", "/api/embeddings"]), BODIES)
def test_ollama_requests_translate_or_are_refused(path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()  # big integers and NaN too, as clients send them
    refused_or_done(lambda: ollama_request(path, raw, 0.0))


@FUZZ
@given(BODIES)
def test_agent_requests_translate_or_are_refused(body: dict[str, Any]) -> None:
    refused_or_done(lambda: anthropic.chat_request(body))
    refused_or_done(lambda: responses.chat_request(body))


# -- the HTTP/1.1 server over sockets ------------------------------------------------------------

TOKEN = st.text(st.characters(codec="ascii", exclude_characters="\r\n :"), min_size=1, max_size=12)
LINE_NOISE = st.binary(max_size=24) | st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ", b":"])
METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"CONNECT"])
TARGETS = st.sampled_from(
    [
        b"/api/chat",
        b"/api/generate",
        b"/v1/chat/completions",
        b"/v1/messages",
        b"/api/tags",
        b"/",
        b"*",
        b"/api/blobs/sha256:" + b"a" * 64,
        b"/parallama/status",
        b"http://x/api/chat",
    ]
) | st.binary(max_size=40)
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Content-Length",
                b"Transfer-Encoding",
                b"Host",
                b"Expect",
                b"Connection",
                b"Origin",
                b"Upgrade",
                b"X-Priority",
            ]
        )
        | TOKEN.map(str.encode),
        st.sampled_from(
            [
                b"0",
                b"5",
                b"-1",
                b"chunked",
                b"100-continue",
                b"close",
                b"localhost",
                b"99999999999999999999",
                b"gzip, chunked",
            ]
        )
        | st.binary(max_size=30),
    ),
    max_size=6,
)
CHUNKED = st.lists(
    st.sampled_from([b"5\r\nhello\r\n", b"0\r\n\r\n", b"ff\r\n", b"zz\r\n", b"0\r\nX: y\r\n\r\n"])
    | st.binary(max_size=20),
    max_size=5,
).map(b"".join)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """A request as an attacker or a broken client writes it: mostly well formed."""
    head = (
        draw(METHODS)
        + b" "
        + draw(TARGETS)
        + b" "
        + draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]))
    )
    lines = [head, *(name + b": " + value for name, value in draw(HEADERS))]
    if draw(st.booleans()):
        lines.append(draw(LINE_NOISE))
    body = draw(
        st.sampled_from([b"", b'{"model": "%s", "prompt": "hi"}' % CHAT_MODEL.encode()])
        | st.binary(max_size=64)
        | CHUNKED
    )
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Unhandled(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture(scope="module")
def fuzzed(sim: SimServer) -> Iterator[tuple[Gateway, Unhandled]]:
    errors = Unhandled()
    logger = logging.getLogger("parallama")
    logger.addHandler(errors)
    try:
        with gateway_with((BackendSettings(url=sim.url),), header_timeout=2, body_timeout=2) as gw:
            yield gw, errors
    finally:
        logger.removeHandler(errors)


def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw`, half-close, read what comes until the server closes (bounded in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(raw)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused mid-send: what it answered is still to be read
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


@FUZZ
@given(raw_requests())
@example(b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"y" * 40000)
@example(b"GET * HTTP/1.1\r\nHost: localhost\r\n\r\n")
def test_the_server_answers_in_http_or_closes_and_keeps_serving(
    fuzzed: tuple[Gateway, Unhandled], raw: bytes
) -> None:
    gateway, errors = fuzzed
    received = exchange(gateway.port, raw)
    if received:
        assert received.startswith(b"HTTP/1.1 "), received[:80]
        status = received[9:12]
        assert status.isdigit() and status != b"500", received[:200]
    assert errors.seen == []


def test_after_the_fuzzing_the_gateway_still_answers(fuzzed: tuple[Gateway, Unhandled]) -> None:
    gateway, errors = fuzzed
    answer = httpx.post(
        f"{gateway.url}/api/generate",
        json={"model": CHAT_MODEL, "prompt": "hi", "stream": False},
        timeout=10,
    )
    assert answer.status_code == 200
    assert errors.seen == []
