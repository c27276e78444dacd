"""Every error `parallama.client` raises is a `ClientError`: code that calls it catches one
class, and never an httpx exception (the transport is the library's business, not its
callers')."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx


class ClientError(Exception):
    """Anything that kept a call from its answer."""


class ResponseError(ClientError):
    """The server answered with an error; the names are the official `ollama` package's."""

    def __init__(self, error: str, status_code: int = -1) -> None:
        super().__init__(error)
        self.error = error
        self.status_code = status_code


class TransportError(ClientError):
    """The connection failed after the request was sent: no answer within the read timeout,
    or the answer cut off midway (a stream broken by a crashing server)."""


class UnreachableError(TransportError, ConnectionError):
    """No endpoint could be reached (connection refused, reset, timed out connecting)."""


@contextlib.contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """httpx's failures while talking to `url`, raised as `TransportError`s."""
    try:
        yield
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise TransportError(f"{url}: {reason}") from exc
