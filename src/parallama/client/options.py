"""What both clients can be told, with the defaults a local LLM server wants."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict
from urllib.parse import urlsplit

import httpx
from typing_extensions import Unpack

from parallama.client.retry import Endpoints, RetryPolicy

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434


def parse_host(host: str | None) -> str:
    """A base URL from a host as Ollama's clients take one (`OLLAMA_HOST`): "", "example.com",
    ":56789", "example.com:56789/path", "https://example.com", "[::1]:56789"... The scheme is
    http unless given; the port 11434 unless given, or with a scheme but no port, the scheme's
    own; a trailing slash goes."""
    text = (host or "").strip()
    scheme, _, rest = text.rpartition("://")
    scheme = scheme or "http"
    parts = urlsplit(f"{scheme}://{rest}")
    hostname = parts.hostname or DEFAULT_HOST
    if ":" in hostname:  # IPv6
        hostname = f"[{hostname}]"
    port = parts.port or (DEFAULT_PORT if "://" not in text else (443 if scheme == "https" else 80))
    return f"{scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


def default_timeout() -> httpx.Timeout:
    # Connecting is quick or never; an answer may take minutes (a long generation, a model
    # load); between two streamed chunks a server is silent at most as long as one token takes.
    return httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=30.0)


class ClientSettings(TypedDict, total=False):
    """How both clients may be set up, besides their hosts and transport (see `Options`)."""

    timeout: float | httpx.Timeout
    retry: RetryPolicy
    failure_threshold: int
    recheck_interval: float
    max_connections: int
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Options:
    """`hosts`: one base URL or several (failover between them); none: `OLLAMA_HOST`, else
    127.0.0.1:11434, as the official client. `timeout`: per phase
    (connect, read, write, waiting for a pooled connection). `retry`: tries, backoff and the
    deadline of a call. `failure_threshold`: failed tries (not answered: refused, reset) that
    open an endpoint's breaker. `recheck_interval`: seconds between checks of an open endpoint.
    `max_connections`: the pool's size (kept alive)."""

    hosts: tuple[str, ...] = (f"http://{DEFAULT_HOST}:{DEFAULT_PORT}",)
    timeout: httpx.Timeout = field(default_factory=default_timeout)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    failure_threshold: int = 3
    recheck_interval: float = 5.0
    max_connections: int = 100
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, host: str | Sequence[str] | None, **settings: Unpack[ClientSettings]) -> Options:
        if host is None:
            host = os.environ.get("OLLAMA_HOST")
        hosts = [host] if isinstance(host, str | None) else list(host)
        default = cls()
        timeout = settings.get("timeout", default.timeout)
        if isinstance(timeout, int | float):
            timeout = httpx.Timeout(timeout, connect=5.0)
        return cls(
            hosts=tuple(parse_host(h) for h in hosts),
            timeout=timeout,
            retry=settings.get("retry", default.retry),
            failure_threshold=settings.get("failure_threshold", default.failure_threshold),
            recheck_interval=settings.get("recheck_interval", default.recheck_interval),
            max_connections=settings.get("max_connections", default.max_connections),
            headers=settings.get("headers", default.headers),
        )

    def endpoints(self) -> Endpoints:
        return Endpoints(list(self.hosts), self.failure_threshold)

    @property
    def limits(self) -> httpx.Limits:
        return httpx.Limits(
            max_connections=self.max_connections, max_keepalive_connections=self.max_connections
        )

    @property
    def retryable_errors(self) -> tuple[type[Exception], ...]:
        """Failures before any answer: refused, or the connection closed with no response
        (a stale keep-alive connection, or a server that died). The last may, rarely, have
        been worked on and is sent again all the same; a read timeout is not retried (the
        server may be generating still)."""
        return (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
