"""How one attempt's answer reaches the client: passed through as bytes when the backend serves
the client's route, or translated: an Ollama request at an OpenAI-dialect engine
(`protocol.translate`), an Anthropic Messages or Responses request at an engine that serves only
`/v1/chat/completions` (`protocol.anthropic`, `protocol.responses`).

The proxy's attempts are the same either way; only these few steps differ.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from parallama.gateway.http.http1 import Headers
from parallama.protocol import anthropic, ollama, openai, responses
from parallama.protocol.anthropic import MessagesAnswer
from parallama.protocol.chat_events import AnswerWriter
from parallama.protocol.responses import ResponsesAnswer
from parallama.protocol.translate import (
    CHAT,
    AnswerTranslator,
    Translated,
    error_message,
    ollama_status,
)

# Headers a proxy must not pass on (hop-by-hop), plus the framing each side sets itself.
_HOP_HEADERS = frozenset(
    h.lower().encode()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",
        "Host",
        "Content-Length",
    )
)
# An answer's Date and Server are the gateway's own, as nginx sets them.
_ANSWER_DROPPED = _HOP_HEADERS | {b"date", b"server"}
_JSON_TYPE = (b"Content-Type", b"application/json")
_NDJSON_TYPE = (b"Content-Type", ollama.NDJSON.encode())
_EVENT_STREAM_TYPE = (b"Content-Type", openai.EVENT_STREAM.encode())
_CONTENT_TYPE = frozenset({b"content-type"})
_REWRITTEN = _CONTENT_TYPE | {b"accept-encoding", b"accept"}


def passable(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]


def content_type_of(headers: Headers) -> bytes:
    return next((v for k, v in headers if k.lower() == b"content-type"), b"")


def _as_json(headers: Headers, dropped: frozenset[bytes]) -> Headers:
    """The headers without `dropped` (lower-case names), saying the body is JSON."""
    return [*((k, v) for k, v in headers if k.lower() not in dropped), _JSON_TYPE]


class PassThrough:
    """The backend's answer, byte for byte."""

    local: bytes | None = None

    def __init__(self, target: bytes, body: bytes, *, json_body: bool = False) -> None:
        """`json_body`: say the body is JSON whatever the client said (the gateway parsed it
        as such): OpenAI-dialect engines such as llama-cpp-python refuse a JSON body sent as
        a form, which Ollama and curl's `-d` are easy about."""
        self.target = target
        self.body = body
        self._json_body = json_body

    def request_headers(self, headers: Headers) -> Headers:
        if not self._json_body:
            return headers
        return _as_json(headers, _CONTENT_TYPE)

    def status(self, status: int) -> int:
        return status

    def headers(self, status: int, upstream: Headers) -> Headers:
        return [(k, v) for k, v in upstream if k.lower() not in _ANSWER_DROPPED]

    def whole(self, status: int, body: bytes) -> bytes:
        return body

    def chunk(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        return b""


class Translating:
    """An OpenAI engine's answer in Ollama's format; errors as `{"error": ...}`."""

    def __init__(self, request: Translated, arrived: float) -> None:
        """`arrived`: when the client's request reached the gateway (wall clock)."""
        self.local = request.local
        self.target = request.target
        self.body = request.body
        self._stream = request.stream
        self._answer = AnswerTranslator(request, arrived=arrived, sent=time.time())

    def request_headers(self, headers: Headers) -> Headers:
        """The client's headers, but for the body's type (clients such as curl may send none or
        another) and its encoding (the answer must arrive plain to be translated)."""
        return _as_json(headers, _REWRITTEN)

    def status(self, status: int) -> int:
        return ollama_status(status)

    def headers(self, status: int, upstream: Headers) -> Headers:
        return [_NDJSON_TYPE if status == 200 and self._stream else _JSON_TYPE]

    def whole(self, status: int, body: bytes) -> bytes:
        if status != 200:
            return ollama.error_body(error_message(body))
        return self._answer.whole(body, time.time())

    def chunk(self, data: bytes) -> bytes:
        return self._answer.feed(data, time.time())

    def end(self) -> bytes:
        return self._answer.end(time.time())


class ToChat:
    """An Anthropic Messages or Responses request done by the engine's `/v1/chat/completions`:
    the answer, and the engine's errors, in the client's API."""

    local: bytes | None = None
    target = CHAT

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        """`data`: the request, naming the model the engine runs (as a passed-through answer
        names it)."""
        model = str(data.get("model", ""))
        self._answer: AnswerWriter
        if path == anthropic.MESSAGES:
            self.body, self._stream = anthropic.chat_request(data)
            self._answer = MessagesAnswer(model, stream=self._stream)
        else:
            self.body, self._stream = responses.chat_request(data)
            self._answer = ResponsesAnswer(model, data, stream=self._stream)
        self._anthropic = path == anthropic.MESSAGES

    def request_headers(self, headers: Headers) -> Headers:
        return _as_json(headers, _REWRITTEN)

    def status(self, status: int) -> int:
        return ollama_status(status)

    def headers(self, status: int, upstream: Headers) -> Headers:
        return [_EVENT_STREAM_TYPE if status == 200 and self._stream else _JSON_TYPE]

    def whole(self, status: int, body: bytes) -> bytes:
        if status == 200:
            return self._answer.whole(body)
        if self._anthropic:
            return anthropic.error_body(status, error_message(body))
        return openai.error_body(status, error_message(body))

    def chunk(self, data: bytes) -> bytes:
        return self._answer.feed(data)

    def end(self) -> bytes:
        return self._answer.end()


Relay = PassThrough | Translating | ToChat
