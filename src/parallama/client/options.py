"""What both clients can be told, with the defaults a local LLM server wants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from parallama.client.retry import Endpoints, RetryPolicy

DEFAULT_HOST = "http://127.0.0.1:11434"


class UnreachableError(ConnectionError):
    """No endpoint could be reached (connection refused, reset, timed out connecting)."""


def default_timeout() -> httpx.Timeout:
    # Connecting is quick or never; an answer may take minutes (a long generation, a model
    # load); between two streamed chunks a server is silent at most as long as one token takes.
    return httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=30.0)


@dataclass(frozen=True)
class Options:
    """`hosts`: one base URL or several (failover between them). `timeout`: per phase
    (connect, read, write, waiting for a pooled connection). `retry`: tries, backoff and the
    deadline of a call. `failure_threshold`: failed tries (not answered: refused, reset) that
    open an endpoint's breaker. `recheck_interval`: seconds between checks of an open endpoint.
    `max_connections`: the pool's size (kept alive)."""

    hosts: tuple[str, ...] = (DEFAULT_HOST,)
    timeout: httpx.Timeout = field(default_factory=default_timeout)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    failure_threshold: int = 3
    recheck_interval: float = 5.0
    max_connections: int = 100
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, host: str | Sequence[str] | None, **options: Any) -> Options:
        hosts = [host] if isinstance(host, str) else list(host or [DEFAULT_HOST])
        if isinstance(options.get("timeout"), int | float):
            options["timeout"] = httpx.Timeout(options["timeout"], connect=5.0)
        return cls(hosts=tuple(_with_scheme(h) for h in hosts), **options)

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


def _with_scheme(host: str) -> str:
    """`localhost:11434` as Ollama's clients take it: http:// when no scheme is given."""
    return host if "://" in host else f"http://{host}"
