"""OpenAI's Responses API (`POST /v1/responses`) as Ollama serves it: stateless, no stored
responses (sans-I/O). What Codex speaks.

Its errors are OpenAI's error object (`protocol.openai`); a stream that began says it failed with
`response.failed`. In front of an engine that serves only `/v1/chat/completions`, the request's
`instructions` and `input` items (messages, `function_call`, `function_call_output`) become chat
messages, and the answer's pieces (`protocol.chat_events`) output items again: `reasoning`,
`message` and `function_call`, each streamed with the events the SDKs and Codex read, every
event numbered (`sequence_number`).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from parallama.errors import ApiError, excerpt
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

RESPONSES = "/v1/responses"
_SAME_FIELDS = ("temperature", "top_p", "parallel_tool_calls")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


# -- the request, for a chat-completions engine --------------------------------------------------


def chat_request(data: dict[str, Any]) -> tuple[bytes, bool]:
    """The `/v1/chat/completions` body that does the Responses request's work, and whether it
    streams; `ApiError` (400) for what cannot be said to such an engine."""
    if data.get("previous_response_id"):
        raise ApiError(400, "previous_response_id is not supported: responses are not stored")
    chat: list[dict[str, Any]] = []
    if isinstance(data.get("instructions"), str) and data["instructions"]:
        chat.append({"role": "system", "content": data["instructions"]})
    given = data.get("input")
    if isinstance(given, str):
        chat.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            _add_item(chat, item)
    else:
        raise ApiError(400, "input: a string or a list of input items is required")
    stream = data.get("stream") is True
    request: dict[str, Any] = {"model": data.get("model"), "messages": chat, "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    if isinstance(data.get("max_output_tokens"), int):
        request["max_tokens"] = data["max_output_tokens"]
    request |= {k: data[k] for k in _SAME_FIELDS if data.get(k) is not None}
    if tools := _tools(data.get("tools")):
        request["tools"] = tools
        if (choice := _tool_choice(data.get("tool_choice"))) is not None:
            request["tool_choice"] = choice
    reasoning = data.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        request["reasoning_effort"] = reasoning["effort"]
    text = data.get("text")
    response_format = text.get("format") if isinstance(text, dict) else None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = {k: v for k, v in response_format.items() if k != "type"}
        request["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        request["response_format"] = {"type": "json_object"}
    return orjson.dumps(request), stream


def _add_item(chat: list[dict[str, Any]], item: Any) -> None:
    if not isinstance(item, dict):
        raise ApiError(400, "input: each item must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = _ROLES.get(str(item.get("role")))
        if role is None:
            given = excerpt(repr(item.get("role")))
            raise ApiError(400, f"input: a message's role cannot be {given}")
        chat.append({"role": role, "content": _content(item.get("content"))})
    elif kind == "function_call":
        call = {
            "id": str(item.get("call_id", "")),
            "type": "function",
            "function": {
                "name": str(item.get("name", "")),
                "arguments": str(item.get("arguments", "")),
            },
        }
        last = chat[-1] if chat else None
        if last is not None and last["role"] == "assistant":  # calls of one turn: one message
            last.setdefault("tool_calls", []).append(call)
        else:
            chat.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output", "")
        text = output if isinstance(output, str) else _text_of(output)
        chat.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text})
    elif kind == "reasoning":
        return  # a stateless engine thinks again; an encrypted reasoning item is not its own
    else:
        raise ApiError(400, f"input: an item of type {excerpt(repr(kind))} is not supported here")


def _content(content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, "input: a message's content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text"):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            given = excerpt(repr(kind))
            raise ApiError(400, f"input: a content part of type {given} is not supported here")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _text_of(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Function tools, those of a `namespace` named `namespace.name` (as Ollama expands them).
    The hosted ones (`web_search`, `file_search`, ...) are OpenAI's services, which an engine
    here does not have: they are left out, as if not offered (Codex offers web search to
    every model)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ApiError(400, "tools: a list is required")
    functions = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise ApiError(400, "tools: each tool must be an object")
        if tool.get("type") == "function":
            functions.append(_function(tool, ""))
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            prefix = f"{tool.get('name', '')}."
            nested = [t for t in tool["tools"] if isinstance(t, dict)]
            functions += [_function(t, prefix) for t in nested if t.get("type") == "function"]
    return functions


def _function(tool: dict[str, Any], prefix: str) -> dict[str, Any]:
    function = {
        "name": prefix + str(tool.get("name", "")),
        "description": str(tool.get("description") or ""),
        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return None


# -- the answer --------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def failed_event(message: str, sequence_number: int = 0, code: str = "server_error") -> bytes:
    """`response.failed`: how a Responses stream says it failed, once it began."""
    response = {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "failed",
        "error": {"code": code, "message": message},
        "output": [],
    }
    event = {"type": "response.failed", "response": response, "sequence_number": sequence_number}
    return named_event("response.failed", event)


class ResponsesAnswer(AnswerWriter):
    """A chat-completions engine's answer to one translated request, as a Responses API
    response: whole, or as its events."""

    def __init__(self, model: str, request: dict[str, Any], *, stream: bool) -> None:
        """`request`: the client's request (a response repeats its settings)."""
        super().__init__(stream=stream)
        self._response: dict[str, Any] = {
            "id": _new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "model": model,
            "output": [],
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": request.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools") or [],
            "top_p": request.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None,
            "metadata": {},
        }
        self._items: list[dict[str, Any]] = []  # the output items, as they are built
        self._open: dict[str, Any] | None = None  # a stream's item still receiving deltas
        self._by_call: dict[int, dict[str, Any]] = {}
        self._finish = "stop"
        self._sequence = 0

    # -- whole ----------------------------------------------------------------------------------

    def written(self, pieces: list[Piece]) -> bytes:
        for piece in pieces:
            self._build(piece)
        return orjson.dumps(self._completed())

    def _build(self, piece: Piece) -> dict[str, Any] | None:
        """Add a piece to the output items; the item it went to, when it began one."""
        if isinstance(piece, Text | Thinking):
            kind = "message" if isinstance(piece, Text) else "reasoning"
            item = self._items[-1] if self._items else None
            if item is None or item["type"] != kind:
                item = self._item(kind)
                self._items.append(item)
                began = item
            else:
                began = None
            item["content"][0]["text"] += piece.text
            return began
        if isinstance(piece, ToolCall):
            item = {
                "id": _new_id("fc_"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": piece.call_id,
                "name": piece.name,
                "arguments": "",
            }
            self._by_call[piece.index] = item
            self._items.append(item)
            return item
        if isinstance(piece, ToolArguments) and piece.index in self._by_call:
            self._by_call[piece.index]["arguments"] += piece.fragment
        elif isinstance(piece, Finished):
            self._finish = piece.reason
        elif isinstance(piece, Counted):
            self._response["usage"] = {
                "input_tokens": piece.prompt_tokens,
                "input_tokens_details": {"cached_tokens": piece.cached_tokens},
                "output_tokens": piece.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": piece.prompt_tokens + piece.completion_tokens,
            }
        return None

    @staticmethod
    def _item(kind: str) -> dict[str, Any]:
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            return {
                "id": _new_id("msg_"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [part],
            }
        part = {"type": "reasoning_text", "text": ""}
        return {"id": _new_id("rs_"), "type": "reasoning", "summary": [], "content": [part]}

    def _completed(self) -> dict[str, Any]:
        for item in self._items:
            if item["type"] != "reasoning":
                item["status"] = "completed"
        response = self._response
        response["output"] = self._items
        if self._finish == "length":
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            response["status"] = "completed"
        return response

    # -- a stream -------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return named_event(kind, event)

    def opening(self) -> bytes:
        snapshot = {**self._response, "output": []}
        created = self._event("response.created", response=snapshot)
        return created + self._event("response.in_progress", response=snapshot)

    def event(self, piece: Piece) -> bytes:
        """The piece's delta, after the events of the item it began (and of the one it ended)."""
        before = self._items[-1] if self._items else None
        began = self._build(piece)
        out = b""
        if began is not None:
            if before is not None:
                out += self._item_done(before)
            out += self._item_added(began)
        return out + self._delta(piece)

    def failed(self, message: str) -> bytes:
        return failed_event(message, self._sequence)

    def closing(self) -> bytes:
        out = self._item_done(self._items[-1]) if self._items else b""
        response = self._completed()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, other in enumerate(self._items) if other is item)

    def _item_added(self, item: dict[str, Any]) -> bytes:
        index = self._index(item)
        shown = {**item, "content": []} if "content" in item else {**item}
        if item["type"] == "function_call":
            shown["arguments"] = ""
        out = self._event("response.output_item.added", output_index=index, item=shown)
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            out += self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            )
        return out

    def _delta(self, piece: Piece) -> bytes:
        if not self._items:
            return b""
        item = self._items[-1]
        where = {"item_id": item["id"], "output_index": self._index(item)}
        if isinstance(piece, Text):
            return self._event(
                "response.output_text.delta",
                **where,
                content_index=0,
                delta=piece.text,
                logprobs=[],
            )
        if isinstance(piece, Thinking):
            return self._event(
                "response.reasoning_text.delta", **where, content_index=0, delta=piece.text
            )
        if isinstance(piece, ToolArguments) and piece.index in self._by_call:
            call = self._by_call[piece.index]
            where = {"item_id": call["id"], "output_index": self._index(call)}
            return self._event(
                "response.function_call_arguments.delta", **where, delta=piece.fragment
            )
        return b""

    def _item_done(self, item: dict[str, Any]) -> bytes:
        index = self._index(item)
        out = b""
        if item["type"] != "reasoning":
            item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out += self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
            out += self._event("response.content_part.done", **where, part=part)
        elif item["type"] == "reasoning":
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out += self._event(
                "response.reasoning_text.done", **where, text=item["content"][0]["text"]
            )
        else:
            out += self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        return out + self._event("response.output_item.done", output_index=index, item=item)
