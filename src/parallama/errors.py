"""The one error every parallama server answers with: an HTTP status and a message.

Each route renders it in its own dialect (`{"error": ...}` for Ollama routes, the OpenAI error
object for `/v1`), so code that finds a problem does not need to know who is asking.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})  # e.g. Retry-After on a 503


def excerpt(text: str, limit: int = 64) -> str:
    """At most `limit` characters of a client's string, for an error message or a log field:
    a client must not be able to make either as long as it likes."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
