"""The OpenAI-compatible dialect: error objects, server-sent events framing, and the objects of
its answers as Ollama's `openai` middleware shapes them."""

from __future__ import annotations

from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"
EVENT_STREAM = "text/event-stream"


def error_type(status: int) -> str:
    """Ollama's mapping from HTTP status to the OpenAI error `type` (`openai.NewError`), with
    OpenAI's own types for the statuses Ollama never sends (a bad key, a limit)."""
    if status in (400, 401, 403):
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    return "api_error"


def error_object(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": code}}


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    return orjson.dumps(error_object(status, message, code))


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


FINGERPRINT = "fp_ollama"  # Ollama's system_fingerprint


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
    }


def completion_header(completion_id: str, model: str, created: int) -> dict[str, Any]:
    """The fields every chunk and answer of one completion repeats."""
    return {
        "id": completion_id,
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }


def chat_chunk(header: dict[str, Any], text: str, finish: str | None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": text}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {**header, "object": "chat.completion.chunk", "choices": [choice]}


def chat_completion(
    header: dict[str, Any], text: str, finish: str, tokens: dict[str, int]
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {**header, "object": "chat.completion", "choices": [choice], "usage": tokens}


def text_completion(header: dict[str, Any], text: str, finish: str | None) -> dict[str, Any]:
    """A `/v1/completions` chunk, or with `usage` added, the whole answer."""
    choice = {"text": text, "index": 0, "finish_reason": finish}
    return {**header, "object": "text_completion", "choices": [choice]}


def model_entry(name: str, created: int) -> dict[str, Any]:
    """A `/v1/models` entry: Ollama names the namespace as the owner, else "library"."""
    owner = name.split("/", maxsplit=1)[0] if "/" in name else "library"
    return {"id": name, "object": "model", "created": created, "owned_by": owner}
