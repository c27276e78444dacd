"""The Ollama API calls both clients make, their answers and their errors (sans-I/O).

The names and arguments follow the official `ollama` package (`chat`, `generate`, `embed`,
`list`, `ps`, `show`), so code can switch by changing an import. Answers are `Answer`s: the JSON
as it came, readable as a dict (`reply["message"]["content"]`) or by attribute
(`reply.message.content`), as the official package's are; the keywords of each call are typed
(`ChatFields`, `GenerateFields`, `EmbedFields`), so a misspelt one is a type error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import orjson
from typing_extensions import Unpack

from parallama.client.errors import ResponseError

# The fields of the API's answers (and of the objects in them): an attribute by one of these
# names reads None when an answer leaves it out, as Ollama does with zero durations; any other
# name is a mistake, and raises.
FIELDS = frozenset(
    (
        "model",
        "created_at",
        "response",
        "message",
        "done",
        "done_reason",
        "context",
        "thinking",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
        "logprobs",
        "role",
        "content",
        "images",
        "tool_calls",
        "tool_name",
        "function",
        "name",
        "arguments",
        "index",
        "embeddings",
        "embedding",
        "models",
        "modified_at",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
        "license",
        "modelfile",
        "parameters",
        "template",
        "system",
        "model_info",
        "projector_info",
        "capabilities",
        "tensors",
        "version",
        "error",
        "status",
    )
)


class Answer(dict[str, Any]):
    """A JSON object, also readable by attribute: a field of the API that the answer leaves out
    reads None, a name that is no field of the API raises AttributeError."""

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return _wrap(self[name])
        if name in FIELDS:
            return None
        raise AttributeError(f"{name!r} is no field of this answer (it has: {', '.join(self)})")


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, Answer):
        return Answer(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class ChatFields(TypedDict, total=False):
    """What `chat` takes besides the model, the messages and `stream`, as the API names it."""

    tools: Sequence[Mapping[str, Any]]  # the functions the model may call (JSON schemas)
    think: bool | Literal["low", "medium", "high"]  # a thinking model's reasoning, apart
    format: Literal["", "json"] | Mapping[str, Any]  # "json", or a JSON schema to follow
    options: Mapping[str, Any]  # runner options: temperature, num_ctx, num_predict, seed...
    keep_alive: float | str  # how long the model stays loaded after: seconds or "5m"


class GenerateFields(TypedDict, total=False):
    """What `generate` takes besides the model, the prompt and `stream`."""

    suffix: str  # text after the completion (fill-in-the-middle)
    system: str  # the system prompt, instead of the model's
    template: str  # the prompt template, instead of the model's
    context: Sequence[int]  # the `context` of an earlier answer, to continue it
    think: bool | Literal["low", "medium", "high"]
    raw: bool  # the prompt as it is, no template
    format: Literal["", "json"] | Mapping[str, Any]
    images: Sequence[str]  # base64-encoded, for multimodal models
    options: Mapping[str, Any]
    keep_alive: float | str


class EmbedFields(TypedDict, total=False):
    """What `embed` takes besides the model and the input."""

    truncate: bool  # cut inputs to the context length (the default), or refuse them
    options: Mapping[str, Any]
    keep_alive: float | str
    dimensions: int  # fewer dimensions, for models that allow it


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
    **fields: Unpack[ChatFields],
) -> Call:
    body = {"model": model, "messages": list(messages or []), "stream": stream, **fields}
    return Call("POST", "/api/chat", _body(body), stream)


def generate(
    model: str, prompt: str = "", *, stream: bool = False, **fields: Unpack[GenerateFields]
) -> Call:
    body = {"model": model, "prompt": prompt, "stream": stream, **fields}
    return Call("POST", "/api/generate", _body(body), stream)


def embed(model: str, input: str | Sequence[str] = "", **fields: Unpack[EmbedFields]) -> Call:
    return Call("POST", "/api/embed", _body({"model": model, "input": input, **fields}))


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
