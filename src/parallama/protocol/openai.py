"""The OpenAI-compatible dialect: error objects and server-sent events framing."""

from __future__ import annotations

from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"
EVENT_STREAM = "text/event-stream"


def error_type(status: int) -> str:
    """Ollama's mapping from HTTP status to the OpenAI error `type` (`openai.NewError`)."""
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def error_object(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": None}}


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps(error_object(status, message))


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
