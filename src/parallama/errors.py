"""parallama's errors: the one every server answers with (an HTTP status and a message), and
the one every command ends with (a line and an exit status).

`ApiError`: each route renders it in its own dialect (`{"error": ...}` for Ollama routes, the
OpenAI error object for `/v1`), so code that finds a problem does not need to know who is asking.
`ParallamaError`: the command line catches it once, for every command.
"""

from __future__ import annotations

from collections.abc import Mapping


class ParallamaError(Exception):
    """A command cannot go on: its message is the one line the user reads."""

    exit_status = 1


class ConfigError(ParallamaError, ValueError):
    """Settings or flags that cannot be used; the message names the setting, its source and
    the fault (exit status 2, as argparse's own usage errors)."""

    exit_status = 2


class StateUnavailable(ParallamaError):
    """The shared state (Redis) did not answer: the caller goes on alone, as without it."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})  # e.g. Retry-After on a 503
        self.code = code  # the OpenAI error object's `code`, e.g. invalid_api_key


def excerpt(text: str, limit: int = 64) -> str:
    """At most `limit` characters of a client's string, for an error message or a log field:
    a client must not be able to make either as long as it likes."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
