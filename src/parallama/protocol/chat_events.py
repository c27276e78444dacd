"""A chat completion's answer as the pieces every other API is made of (sans-I/O).

The Anthropic Messages API and OpenAI's Responses API, in front of an engine that serves only
`/v1/chat/completions`, both need the same few facts from its answer, whole or streamed: text,
reasoning, tool calls (a name, then the arguments in fragments), why it stopped, and the token
counts. `ChatReader` turns the engine's bytes into those pieces; an `AnswerWriter` of
`protocol.anthropic` or `protocol.responses` writes them in its API's format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import orjson

from parallama.protocol.sse import EventReader, EventTooLarge
from parallama.protocol.translate import BadAnswer, error_message


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Thinking:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call begins; its arguments follow as `ToolArguments` with the same index."""

    index: int
    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArguments:
    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # the engine's finish_reason: "stop", "length", "tool_calls", ...


@dataclass(frozen=True, slots=True)
class Counted:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine said, inside its stream, that it failed."""

    message: str


Piece = Text | Thinking | ToolCall | ToolArguments | Finished | Counted | Failed


class ChatReader:
    """One chat completion's answer, as pieces: `whole` for a JSON answer, `feed` for the bytes
    of a stream (`done` once its `[DONE]` came)."""

    def __init__(self) -> None:
        self._events = EventReader()
        self._calls: set[int] = set()
        self.done = False

    def whole(self, body: bytes) -> list[Piece]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadAnswer("sent an answer that is not JSON") from None
        choice = _first(data.get("choices")) if isinstance(data, dict) else None
        if choice is None:
            raise BadAnswer("sent an answer without choices")
        message = _object(choice.get("message"))
        pieces: list[Piece] = []
        if reasoning := _text(message.get("reasoning_content") or message.get("reasoning")):
            pieces.append(Thinking(reasoning))
        if text := _text(message.get("content")):
            pieces.append(Text(text))
        for index, call in enumerate(_list(message.get("tool_calls"))):
            pieces += self._tool_call({**_object(call), "index": index})
        pieces.append(Finished(str(choice.get("finish_reason") or "stop")))
        if (counted := _counted(data.get("usage"))) is not None:
            pieces.append(counted)
        self.done = True
        return pieces

    def feed(self, chunk: bytes) -> list[Piece]:
        try:
            events = self._events.feed(chunk)
        except EventTooLarge as exc:
            raise BadAnswer(f"sent {exc}") from None
        pieces: list[Piece] = []
        for _, payload in events:
            if self.done:
                break
            pieces += self._event(payload)
        return pieces

    def _event(self, payload: bytes) -> list[Piece]:
        if payload.strip() == b"[DONE]":
            self.done = True
            return []
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return []  # not an event of OpenAI's: a keep-alive or an engine's own note
        if not isinstance(data, dict):
            return []
        if "error" in data:
            self.done = True
            return [Failed(error_message(payload))]
        pieces: list[Piece] = []
        choice = _first(data.get("choices"))
        if choice is not None:
            delta = _object(choice.get("delta"))
            if reasoning := _text(delta.get("reasoning_content") or delta.get("reasoning")):
                pieces.append(Thinking(reasoning))
            if text := _text(delta.get("content")):
                pieces.append(Text(text))
            for call in _list(delta.get("tool_calls")):
                pieces += self._tool_call(_object(call))
            if choice.get("finish_reason"):
                pieces.append(Finished(str(choice["finish_reason"])))
        if (counted := _counted(data.get("usage"))) is not None:
            pieces.append(counted)
        return pieces

    def _tool_call(self, call: dict[str, Any]) -> list[Piece]:
        """OpenAI streams a call's id and name first, then its arguments in fragments; Ollama
        sends each call whole, its arguments an object or a string."""
        index = call.get("index")
        index = index if isinstance(index, int) else len(self._calls)
        function = _object(call.get("function"))
        pieces: list[Piece] = []
        if index not in self._calls:
            self._calls.add(index)
            call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{index}"
            pieces.append(ToolCall(index, str(call_id), _text(function.get("name"))))
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = orjson.dumps(arguments).decode()
        if isinstance(arguments, str) and arguments:
            pieces.append(ToolArguments(index, arguments))
        return pieces


class AnswerWriter(ABC):
    """The engine's answer to one translated request, in another API: one object (`whole`), or
    that API's event stream, fed the engine's bytes as they come and ended by `end`."""

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self._reader = ChatReader()
        self._started = False
        self.done = False

    def whole(self, body: bytes) -> bytes:
        pieces = self._reader.whole(body)
        if self.stream:  # asked for a stream, answered whole: the stream of that one answer
            return self.feed_pieces(pieces) + self.end()
        self.done = True
        return self.written(pieces)

    def feed(self, data: bytes) -> bytes:
        return self.feed_pieces(self._reader.feed(data))

    def feed_pieces(self, pieces: list[Piece]) -> bytes:
        """Events for the pieces; nothing before the first (a translated stream that told the
        client nothing yet can still fail over to another backend)."""
        if not pieces or self.done:
            return b""
        out = [self.start()]
        for piece in pieces:
            if isinstance(piece, Failed):
                out.append(self.failed(piece.message))
                self.done = True
                break
            out.append(self.event(piece))
        return b"".join(out)

    def start(self) -> bytes:
        """What a stream begins with, once."""
        if self._started:
            return b""
        self._started = True
        return self.opening()

    def end(self) -> bytes:
        """The engine's stream ended: what closes the client's."""
        if self.done:
            return b""
        self.done = True
        return self.start() + self.closing()

    @abstractmethod
    def written(self, pieces: list[Piece]) -> bytes:
        """The whole answer."""

    @abstractmethod
    def opening(self) -> bytes: ...

    @abstractmethod
    def event(self, piece: Piece) -> bytes:
        """A stream's events for one piece (none for what only the end tells)."""

    @abstractmethod
    def failed(self, message: str) -> bytes:
        """How the stream says the engine failed in it."""

    @abstractmethod
    def closing(self) -> bytes: ...


def _counted(usage: Any) -> Counted | None:
    if not isinstance(usage, dict):
        return None
    details = _object(usage.get("prompt_tokens_details"))
    return Counted(
        _int(usage.get("prompt_tokens")),
        _int(usage.get("completion_tokens")),
        _int(details.get("cached_tokens")),
    )


def _first(value: Any) -> dict[str, Any] | None:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
