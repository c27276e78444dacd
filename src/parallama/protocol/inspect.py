"""What the gateway must know of a request before it can queue it (sans-I/O).

Only the fields that routing needs are read: the model, whether the answer streams, who the
client is (for fair queueing), its priority and its conversation (for session affinity). The body
itself is passed on untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from parallama.errors import ApiError
from parallama.protocol import anthropic, ollama, openai
from parallama.protocol.bodies import parse_json_object

# Whose error object a route answers with: Ollama's `{"error": ...}`, OpenAI's, or Anthropic's.
Dialect = Literal["ollama", "openai", "anthropic"]

# Routes that carry a model, and whether each streams when the body does not say.
STREAM_DEFAULTS: dict[str, tuple[Dialect, bool]] = {
    "/api/generate": ("ollama", True),
    "/api/chat": ("ollama", True),
    "/api/embed": ("ollama", False),
    "/api/embeddings": ("ollama", False),
    "/api/show": ("ollama", False),
    "/v1/chat/completions": ("openai", False),
    "/v1/completions": ("openai", False),
    "/v1/embeddings": ("openai", False),
    "/v1/responses": ("openai", False),
    "/v1/messages": ("anthropic", False),
}
PRIORITY_RANGE = range(-10, 11)
MAX_DEADLINE = 86_400


@dataclass(slots=True)
class RequestInfo:
    dialect: Dialect
    model: str
    stream: bool
    client: str
    priority: int
    deadline: float | None = None  # X-Request-Deadline: seconds the client will wait at most
    queue_updates: bool = False  # told while queued: X-Queue-Updates: 1, or an agent's stream
    session_id: str = ""  # the X-Session-Id header
    leading: Any = None  # the conversation's beginning (see `leading_part`)
    material: Any = None  # what the prompt is made of (see `prompt_material`)

    @property
    def session(self) -> str:
        """What makes two requests one conversation: `X-Session-Id`, else the client and the
        conversation's beginning, which stays the same as the conversation grows. Hashed (it
        may hold prompt text), and only when session affinity asks for it: hashing costs."""
        if self.session_id:
            return "id:" + self.session_id
        if self.leading is None:
            return self.client
        conversation = orjson.dumps([self.client, self.leading])
        return "conv:" + hashlib.blake2b(conversation, digest_size=12).hexdigest()


def dialect_of(path: str) -> Dialect:
    if path.startswith(anthropic.MESSAGES):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


def api_key_of(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: `Authorization: Bearer <key>` (Ollama's and OpenAI's clients), else
    `x-api-key` (Anthropic's); None if neither."""
    scheme, _, given = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip()
    return headers.get("x-api-key", "").strip() or None


def client_identity(headers: Mapping[str, str], remote: str) -> str:
    """Who is asking, for fairness: API key (as a short hash, never the key), else
    `X-Client-Id`, else the remote address."""
    key = api_key_of(headers)
    if key is not None:
        return f"key:{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    client_id = headers.get("X-Client-Id", "").strip()
    if client_id:
        return f"id:{client_id[:128]}"
    return f"addr:{remote}"


def parse_priority(headers: Mapping[str, str]) -> int:
    raw = headers.get("X-Priority", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"X-Priority must be a whole number, not {raw[:32]!r}") from None
    if value not in PRIORITY_RANGE:
        raise ApiError(400, "X-Priority must be between -10 and 10")
    return value


def parse_deadline(headers: Mapping[str, str]) -> float | None:
    """`X-Request-Deadline`: the seconds the client will wait for its answer at most."""
    raw = headers.get("X-Request-Deadline", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"X-Request-Deadline must be seconds, not {raw[:32]!r}") from None
    if not 0 < value <= MAX_DEADLINE:  # also NaN
        raise ApiError(400, f"X-Request-Deadline must be above 0 and at most {MAX_DEADLINE} s")
    return value


def leading_part(path: str, data: Mapping[str, Any]) -> Any:
    """A conversation's beginning: its messages up to the first user message (any system
    prompt, and the first question), or the prompt's first 256 characters; None if the request
    has neither. The first turn already holds all of it, and every later turn repeats it.
    Anthropic's `system` and the Responses API's `instructions` stand beside the messages."""
    if path in (anthropic.MESSAGES, "/v1/responses"):
        system = data.get("system", data.get("instructions"))
        turns = data.get("messages", data.get("input"))
        return [system, leading_part("/v1/chat/completions", {"messages": turns})]
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        first_user = next(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
            0,
        )
        return messages[: first_user + 1]
    prompt = data.get("prompt")
    return prompt[:256] if isinstance(prompt, str) else None


def prompt_material(path: str, data: Mapping[str, Any]) -> Any:
    """What the engine's prompt is made of, in the order it renders it: the system prompt (or
    instructions), the tools, then the messages (or input); or the system prompt and the prompt;
    None if neither (embeddings). Prefix affinity hashes it."""
    if path == anthropic.MESSAGES:
        return [data.get("system"), data.get("tools"), data.get("messages")]
    if path == "/v1/responses":
        return [data.get("instructions"), data.get("tools"), data.get("input")]
    messages = data.get("messages")
    if isinstance(messages, list):
        return [data["tools"], messages] if data.get("tools") else messages
    prompt = data.get("prompt")
    return None if prompt is None else [data.get("system"), prompt]


def inspect_request(path: str, body: bytes, headers: Mapping[str, str], remote: str) -> RequestInfo:
    """Read model, stream, client, priority and deadline; raise `ApiError` for what cannot be
    sent."""
    dialect, stream_default = STREAM_DEFAULTS[path]
    data = parse_json_object(body)
    model = data.get("model")
    if path == "/api/show" and not model:
        model = data.get("name")  # /api/show still accepts the old field
    if not isinstance(model, str) or not (model := model.strip()):
        raise ApiError(400, "model is required")
    if (too_long := ollama.name_too_long(model)) is not None:
        raise ApiError(400, f"invalid model name: {too_long}")
    stream = data.get("stream", stream_default)
    if stream is None:
        stream = stream_default
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    return RequestInfo(
        dialect=dialect,
        model=model,
        stream=stream,
        client=client_identity(headers, remote),
        priority=parse_priority(headers),
        deadline=parse_deadline(headers),
        # Only SSE has comments, which every SSE client skips; NDJSON has nothing of the kind.
        # The agents' streams always get them (Anthropic's as its own `ping`): their clients
        # wait long for slots, and send no header of ours.
        queue_updates=stream and (path in _ALWAYS_TOLD or _told(dialect, headers)),
        session_id=headers.get("X-Session-Id", "").strip()[:128],
        leading=leading_part(path, data),
        material=prompt_material(path, data),
    )


_ALWAYS_TOLD = frozenset({anthropic.MESSAGES, "/v1/responses"})


def _told(dialect: Dialect, headers: Mapping[str, str]) -> bool:
    return dialect == "openai" and headers.get("X-Queue-Updates") == "1"


def with_model(body: bytes, model: str) -> bytes:
    """The body naming `model` and no other: what an alias is sent to the backends as, and a
    request of a key held to some models. Go's JSON decoder, Ollama's, matches field names
    whatever their case (the last one wins), so `"MODEL"` beside `"model"` would run another
    model than the one checked: every spelling of `model` and `name` goes (`name` is
    /api/show's old field, which would win over `model` at an old Ollama)."""
    data = orjson.loads(body)
    for field in [f for f in data if f.casefold() in ("model", "name")]:
        del data[field]
    data["model"] = model
    return orjson.dumps(data)


PINNABLE_PATHS = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})


def with_pins(
    body: bytes,
    model: str,
    *,
    keep_alive: str | float | None,
    options: Mapping[str, Any],
    strict: bool,
) -> bytes:
    """The body with the model's pinned `keep_alive` and runner `options` (Ollama reloads a
    loaded model for a request whose runner options differ, and unloads it at a `keep_alive`
    of 0). Every spelling of the two fields goes, as Go's decoder would read any of them; the
    client's other options stay. `strict`: a client option that differs is a 400 instead."""
    data = orjson.loads(body)
    given: dict[str, Any] = {}
    for field in [f for f in data if f.casefold() in ("options", "keep_alive")]:
        value = data.pop(field)
        if field.casefold() == "options" and isinstance(value, dict):
            given.update(value)
        elif field.casefold() == "keep_alive" and keep_alive is None:
            data["keep_alive"] = value  # not pinned: the client's, as sent
    if strict:
        differing = sorted(k for k, v in options.items() if k in given and given[k] != v)
        if differing:
            pins = ", ".join(f"{k} = {options[k]!r}" for k in differing)
            raise ApiError(400, f"model {model!r} runs with {pins}: leave it out or send that")
    if given or options:
        data["options"] = {**given, **options}
    if keep_alive is not None:
        data["keep_alive"] = keep_alive
    return orjson.dumps(data)


def error_body(dialect: Dialect, status: int, message: str, code: str | None = None) -> bytes:
    """An error in the dialect's own format (only OpenAI's has a `code`)."""
    if dialect == "openai":
        return openai.error_body(status, message, code)
    if dialect == "anthropic":
        return anthropic.error_body(status, message)
    return ollama.error_body(message)
