"""Cross-origin requests as Ollama admits them (its `OLLAMA_ORIGINS`, gin-contrib/cors): the
origins a browser may call the gateway from, preflights answered, `Access-Control-*` on answers.

Sans-I/O: a request's `Origin` and method in, the headers to add (or a refusal) out. An origin
not admitted is a 403 with an empty body, as Ollama's is; a request without `Origin`, or from the
gateway's own origin (its dashboard), is not a cross-origin request at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Ollama's defaults (envconfig.AllowedOrigins), admitted whatever else is set: pages on this
# machine, and the schemes of desktop apps and editor views that embed a web page.
DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    *("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"),
)
_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# What the OpenAI and Anthropic browser SDKs and Ollama's clients send; a preflight asking for
# more is told these (the browser then refuses the request, as it would at Ollama).
_HEADERS = (
    b"authorization, content-type, user-agent, accept, x-requested-with, openai-beta, "
    b"x-api-key, anthropic-version, anthropic-beta, anthropic-dangerous-direct-browser-access, "
    b"x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
    b"x-stainless-runtime, x-stainless-runtime-version, x-stainless-retry-count, "
    b"x-stainless-timeout, x-stainless-async, x-stainless-helper-method, x-stainless-poll-helper, "
    b"x-stainless-custom-poll-interval, x-session-id, x-client-id, x-priority, x-queue-updates"
)
_MAX_AGE = b"43200"  # 12 hours, gin-contrib/cors's default
# What a page may read of an answer beyond the simple headers: the waits and limits it is told.
_EXPOSED = (
    b"retry-after, x-queue-wait-ms, x-ratelimit-limit-requests, "
    b"x-ratelimit-remaining-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens"
)


def _pattern(origins: Iterable[str]) -> re.Pattern[str]:
    """One expression for every admitted origin; `*` stands for any run of characters."""
    alternatives = (".*".join(map(re.escape, o.lower().split("*"))) for o in origins)
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


@dataclass(frozen=True)
class Decision:
    """What a request's origin is owed: refused (403), answered here (a preflight), or
    served with `headers` added."""

    refused: bool = False
    preflight: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()


_SAME_ORIGIN = Decision()


class Origins:
    """The origins admitted: Ollama's defaults and the `allowed_origins` setting (`*`: any)."""

    def __init__(self, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        self._any = "*" in allowed
        self._match = _pattern((*DEFAULT_ORIGINS, *allowed))

    def admits(self, origin: str) -> bool:
        return self._any or self._match.fullmatch(origin.lower()) is not None

    def decide(self, method: str, headers: Mapping[str, str]) -> Decision:
        origin = headers.get("Origin")
        if origin is None:
            return _SAME_ORIGIN
        host = headers.get("Host") or ""
        if origin in (f"http://{host}", f"https://{host}"):
            return _SAME_ORIGIN  # the dashboard's own page
        if not self.admits(origin):
            return Decision(refused=True)
        allow = (
            (b"access-control-allow-origin", b"*" if self._any else origin.encode("latin-1")),
            (b"vary", b"Origin"),
        )
        if method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            return Decision(
                preflight=True,
                headers=(
                    *allow,
                    (b"access-control-allow-methods", _METHODS),
                    (b"access-control-allow-headers", _HEADERS),
                    (b"access-control-max-age", _MAX_AGE),
                ),
            )
        return Decision(headers=(*allow, (b"access-control-expose-headers", _EXPOSED)))
