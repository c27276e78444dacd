"""The Anthropic Messages API (`POST /v1/messages`), as Claude Code and the `anthropic` SDKs speak
it (sans-I/O): its error object, and the API in front of an engine that serves only
`/v1/chat/completions` (an Ollama before v0.14, or an engine without the route) — the request one
way, the answer back, whole or as Anthropic's event stream.

A request's `system`, content blocks (text, images, `tool_use`, `tool_result`, `thinking`) and
`tools` become chat messages and function tools; the answer's pieces (`protocol.chat_events`)
become content blocks again: `thinking`, `text` and `tool_use`, in the order they came.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from parallama.errors import ApiError
from parallama.protocol.chat_events import (
    AnswerWriter,
    Counted,
    Finished,
    Piece,
    Text,
    Thinking,
    ToolArguments,
    ToolCall,
)
from parallama.protocol.sse import named_event

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
PING = named_event("ping", {"type": "ping"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_SAME_FIELDS = ("temperature", "top_p", "top_k")


def error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def error_object(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps(error_object(status, message))


def error_event(status: int, message: str) -> bytes:
    """How a stream that already began says it failed (Anthropic's own `event: error`)."""
    return named_event("error", error_object(status, message))


# -- the request, for a chat-completions engine --------------------------------------------------


def chat_request(data: dict[str, Any]) -> tuple[bytes, bool]:
    """The `/v1/chat/completions` body that does the Messages request's work, and whether it
    streams; `ApiError` (400) for what cannot be said to such an engine."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages: a list of message objects is required")
    chat: list[dict[str, Any]] = []
    if system := _plain_text(data.get("system"), "system"):
        chat.append({"role": "system", "content": system})
    for message in messages:
        chat += _chat_messages(message)
    stream = data.get("stream") is True
    request: dict[str, Any] = {"model": data.get("model"), "messages": chat, "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    if isinstance(data.get("max_tokens"), int):
        request["max_tokens"] = data["max_tokens"]
    request |= {k: data[k] for k in _SAME_FIELDS if data.get(k) is not None}
    if isinstance(data.get("stop_sequences"), list) and data["stop_sequences"]:
        request["stop"] = data["stop_sequences"]
    if tools := _tools(data.get("tools")):
        request["tools"] = tools
        request |= _tool_choice(data.get("tool_choice"))
    if (effort := _reasoning_effort(data.get("thinking"))) is not None:
        request["reasoning_effort"] = effort
    return orjson.dumps(request), stream


def _plain_text(value: Any, where: str) -> str:
    """A string, or a list of text blocks (as `system` and `tool_result` content may be)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for block in value:
            if not isinstance(block, dict) or block.get("type") != "text":
                raise ApiError(400, f"{where}: only text blocks are supported here")
            texts.append(str(block.get("text", "")))
        return "\n".join(texts)
    raise ApiError(400, f"{where}: a string or a list of text blocks is required")


def _chat_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: a user's `tool_result` blocks become `tool`
    messages (first: they answer the calls of the assistant message before), an assistant's
    `tool_use` blocks its `tool_calls`, images data-URL parts."""
    role = message.get("role")
    if role == "system":  # Claude Code sends its environment so, amid the turns
        return [{"role": "system", "content": _plain_text(message.get("content"), "system")}]
    if role not in ("user", "assistant"):
        raise ApiError(400, "messages: each role must be 'user', 'assistant' or 'system'")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise ApiError(400, "messages: content must be a string or a list of blocks")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[str] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        elif kind == "tool_use" and role == "assistant":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": str(block.get("name", "")), "arguments": arguments}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            text = _plain_text(_result_text(block.get("content")), "tool_result")
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append(
                {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text}
            )
        elif kind == "thinking" and role == "assistant":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue  # encrypted for Anthropic's own models: nothing an engine can read
        else:
            raise ApiError(
                400, f"messages: a {role} content block of type {kind!r} is not supported"
            )
    if not parts and not calls and not thinking:
        return results
    out: dict[str, Any] = {"role": role, "content": _content(parts)}
    if calls:
        out["tool_calls"] = calls
    if thinking:
        out["reasoning_content"] = "\n".join(thinking)
    return [*results, out]


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text alone as a string (what every engine takes); with images, the parts."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _result_text(content: Any) -> Any:
    """A `tool_result`'s content, its images left out (a tool message carries text only)."""
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict) and b.get("type") == "text"]
    return content


def _image_url(block: dict[str, Any]) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if isinstance(source, dict) and source.get("type") == "url":
        return str(source.get("url", ""))
    raise ApiError(400, "messages: an image needs a base64 or url source")


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Custom tools as functions. Anthropic's server tools (`web_search_20250305`, ...) run at
    Anthropic, which an engine here is not: they are left out, as if not offered."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ApiError(400, "tools: a list is required")
    functions = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise ApiError(400, "tools: each tool must be an object")
        if tool.get("type", "custom") != "custom":
            continue
        function = {
            "name": str(tool.get("name", "")),
            "description": str(tool.get("description", "")),
            "parameters": tool.get("input_schema") or {"type": "object"},
        }
        functions.append({"type": "function", "function": function})
    return functions


def _tool_choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        return {}
    kind = choice.get("type")
    chosen: dict[str, Any] = {}
    if kind == "any":
        chosen["tool_choice"] = "required"
    elif kind == "none":
        chosen["tool_choice"] = "none"
    elif kind == "tool":
        chosen["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use") is True:
        chosen["parallel_tool_calls"] = False
    return chosen


def _reasoning_effort(thinking: Any) -> str | None:
    """Anthropic's thinking budget as the effort OpenAI-dialect engines take (Ollama's think
    levels, llama.cpp's and vLLM's reasoning)."""
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    budget = budget if isinstance(budget, int) else 0
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


# -- the answer --------------------------------------------------------------------------------


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


class MessagesAnswer(AnswerWriter):
    """A chat-completions engine's answer to one translated request, as Anthropic's: one
    message object, or its event stream (`message_start`, each block's `content_block_start`,
    deltas and `content_block_stop`, `message_delta` with the stop reason and counts,
    `message_stop`)."""

    def __init__(self, model: str, *, stream: bool) -> None:
        super().__init__(stream=stream)
        self.model = model
        self._id = message_id()
        self._blocks: list[dict[str, Any]] = []  # a stream's blocks so far, each its kind
        self._open: tuple[str, int] | None = None  # a stream's open block: its kind and key
        self._stop = "end_turn"
        self._usage = {"input_tokens": 0, "output_tokens": 0}

    # -- whole ----------------------------------------------------------------------------------

    def written(self, pieces: list[Piece]) -> bytes:
        content: list[dict[str, Any]] = []
        calls: dict[int, dict[str, Any]] = {}
        arguments: dict[int, list[str]] = {}
        for piece in pieces:
            if isinstance(piece, Text):
                content.append({"type": "text", "text": piece.text})
            elif isinstance(piece, Thinking):
                content.append({"type": "thinking", "thinking": piece.text, "signature": ""})
            elif isinstance(piece, ToolCall):
                calls[piece.index] = {"type": "tool_use", "id": _tool_id(piece), "name": piece.name}
                content.append(calls[piece.index])
            elif isinstance(piece, ToolArguments):
                arguments.setdefault(piece.index, []).append(piece.fragment)
            else:
                self._note(piece)
        for index, call in calls.items():
            call["input"] = _arguments_object("".join(arguments.get(index, [])))
        return orjson.dumps(self._message(content))

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self._stop,
            "stop_sequence": None,
            "usage": self._usage,
        }

    def _note(self, piece: Piece) -> None:
        if isinstance(piece, Finished):
            self._stop = _STOP_REASONS.get(piece.reason, "end_turn")
        elif isinstance(piece, Counted):
            prompt = max(0, piece.prompt_tokens - piece.cached_tokens)
            self._usage = {"input_tokens": prompt, "output_tokens": piece.completion_tokens}
            if piece.cached_tokens:
                self._usage["cache_read_input_tokens"] = piece.cached_tokens

    # -- a stream -------------------------------------------------------------------------------

    def opening(self) -> bytes:
        """`message_start`, before the engine's first token."""
        started = {**self._message([]), "stop_reason": None}
        return named_event("message_start", {"type": "message_start", "message": started})

    def event(self, piece: Piece) -> bytes:
        if isinstance(piece, Text):
            return self._delta("text", 0, {"type": "text_delta", "text": piece.text})
        if isinstance(piece, Thinking):
            return self._delta("thinking", 0, {"type": "thinking_delta", "thinking": piece.text})
        if isinstance(piece, ToolCall):
            block = {"type": "tool_use", "id": _tool_id(piece), "name": piece.name, "input": {}}
            return self._close() + self._open_block("tool_use", piece.index, block)
        if isinstance(piece, ToolArguments):
            delta = {"type": "input_json_delta", "partial_json": piece.fragment}
            return self._delta("tool_use", piece.index, delta)
        self._note(piece)
        return b""

    def failed(self, message: str) -> bytes:
        return error_event(500, message)

    def closing(self) -> bytes:
        """The last block closed, the stop reason and counts."""
        delta = {"stop_reason": self._stop, "stop_sequence": None}
        finished = {"type": "message_delta", "delta": delta, "usage": self._usage}
        return b"".join(
            (
                self._close(),
                named_event("message_delta", finished),
                named_event("message_stop", {"type": "message_stop"}),
            )
        )

    def _delta(self, kind: str, key: int, delta: dict[str, Any]) -> bytes:
        opened = b""
        if self._open != (kind, key):
            opened = self._close()
            empty: dict[str, Any] = {"type": kind}
            empty |= {"text": ""} if kind == "text" else {"thinking": "", "signature": ""}
            opened += self._open_block(kind, key, empty)
        index = len(self._blocks) - 1
        event = {"type": "content_block_delta", "index": index, "delta": delta}
        return opened + named_event("content_block_delta", event)

    def _open_block(self, kind: str, key: int, block: dict[str, Any]) -> bytes:
        self._open = (kind, key)
        self._blocks.append({"type": kind})
        event = {
            "type": "content_block_start",
            "index": len(self._blocks) - 1,
            "content_block": block,
        }
        return named_event("content_block_start", event)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        event = {"type": "content_block_stop", "index": len(self._blocks) - 1}
        return named_event("content_block_stop", event)


def _tool_id(call: ToolCall) -> str:
    """Anthropic's clients send a `tool_use` id back with its result: the engine's, kept."""
    return call.call_id or f"toolu_{call.index}"


def _arguments_object(arguments: str) -> Any:
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}  # a model that wrote broken JSON: the client sees an empty input
    return value if isinstance(value, dict) else {}
