"""The Ollama API calls both clients make, their answers and their errors (sans-I/O).

The names and arguments follow the official `ollama` package (`chat`, `generate`, `embed`,
`list`, `ps`, `show`), so code can switch by changing an import. Answers are `Answer`s: the JSON
as it came, readable as a dict (`reply["message"]["content"]`) or by attribute
(`reply.message.content`), as the official package's are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


class ResponseError(Exception):
    """The server answered with an error; the names are the official package's."""

    def __init__(self, error: str, status_code: int = -1) -> None:
        super().__init__(error)
        self.error = error
        self.status_code = status_code


class Answer(dict[str, Any]):
    """A JSON object, also readable by attribute (None for a field that is absent)."""

    def __getattr__(self, name: str) -> Any:
        return _wrap(self.get(name))


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, Answer):
        return Answer(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: bytes = b""
    stream: bool = False


def _body(fields: Mapping[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in fields.items() if v is not None})


def chat(
    model: str,
    messages: Sequence[Mapping[str, Any]] | None = None,
    *,
    stream: bool = False,
    **more: Any,
) -> Call:
    """`more`: tools, format, options, keep_alive, think ... as the API takes them."""
    fields = {"model": model, "messages": list(messages or []), "stream": stream, **more}
    return Call("POST", "/api/chat", _body(fields), stream)


def generate(model: str, prompt: str = "", *, stream: bool = False, **more: Any) -> Call:
    fields = {"model": model, "prompt": prompt, "stream": stream, **more}
    return Call("POST", "/api/generate", _body(fields), stream)


def embed(model: str, input: str | Sequence[str] = "", **more: Any) -> Call:
    return Call("POST", "/api/embed", _body({"model": model, "input": input, **more}))


def show(model: str) -> Call:
    return Call("POST", "/api/show", _body({"model": model}))


LIST = Call("GET", "/api/tags")
PS = Call("GET", "/api/ps")
VERSION = Call("GET", "/api/version")


def answer(body: bytes) -> Answer:
    value = orjson.loads(body) if body.strip() else {}
    return Answer(value) if isinstance(value, dict) else Answer({"value": value})


def error_of(status: int, body: bytes) -> ResponseError:
    """The server's `{"error": ...}` (or its OpenAI-style object, or its text) as an exception."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ResponseError(body.decode("utf-8", "replace").strip() or f"HTTP {status}", status)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return ResponseError(str(error) if error else f"HTTP {status}", status)


def chunk(line: bytes) -> Answer | None:
    """One NDJSON line of a stream; `ResponseError` for the error line that ends a broken one."""
    if not line.strip():
        return None
    value = answer(line)
    if "error" in value:
        raise ResponseError(str(value["error"]), 200)
    return value
