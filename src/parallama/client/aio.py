"""`AsyncClient`: the Ollama API from asyncio code, with a bounded `gather` and `map` for
submitting many requests at once (the seed's `simulate_load`, done right)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import httpx
from typing_extensions import Unpack

from parallama.client import calls
from parallama.client.calls import Answer, Call, ChatFields, EmbedFields, GenerateFields
from parallama.client.errors import TransportError, UnreachableError, transport_errors
from parallama.client.options import ClientSettings, Options
from parallama.client.retry import Attempts, OutOfTries

T = TypeVar("T")
Item = TypeVar("Item")


class AsyncClient:
    """The asyncio twin of `Client`: the same calls, awaited; streams are async iterators.
    Cancelling a call closes its connection, so the server frees its slot at once."""

    def __init__(
        self,
        host: str | Sequence[str] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **settings: Unpack[ClientSettings],
    ) -> None:
        """As `Client`'s; `transport`: httpx's async one, for tests."""
        self.options = Options.of(host, **settings)
        self.endpoints = self.options.endpoints()
        self._http = httpx.AsyncClient(
            timeout=self.options.timeout,
            limits=self.options.limits,
            headers=self.options.headers,
            transport=transport,
        )
        self._rng = random.Random()
        self._checker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        await self._http.aclose()

    # -- the API --------------------------------------------------------------------------------

    @overload
    async def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = ...,
        *,
        stream: Literal[False] = ...,
        **fields: Unpack[ChatFields],
    ) -> Answer: ...
    @overload
    async def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = ...,
        *,
        stream: Literal[True],
        **fields: Unpack[ChatFields],
    ) -> AsyncIterator[Answer]: ...
    async def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[ChatFields],
    ) -> Answer | AsyncIterator[Answer]:
        return await self._call(calls.chat(model, messages, stream=stream, **fields))

    @overload
    async def generate(
        self,
        model: str,
        prompt: str = ...,
        *,
        stream: Literal[False] = ...,
        **fields: Unpack[GenerateFields],
    ) -> Answer: ...
    @overload
    async def generate(
        self,
        model: str,
        prompt: str = ...,
        *,
        stream: Literal[True],
        **fields: Unpack[GenerateFields],
    ) -> AsyncIterator[Answer]: ...
    async def generate(
        self,
        model: str,
        prompt: str = "",
        *,
        stream: bool = False,
        **fields: Unpack[GenerateFields],
    ) -> Answer | AsyncIterator[Answer]:
        return await self._call(calls.generate(model, prompt, stream=stream, **fields))

    async def embed(
        self, model: str, input: str | Sequence[str] = "", **fields: Unpack[EmbedFields]
    ) -> Answer:
        return await self._whole(calls.embed(model, input, **fields))

    async def list(self) -> Answer:
        return await self._whole(calls.LIST)

    async def ps(self) -> Answer:
        return await self._whole(calls.PS)

    async def show(self, model: str) -> Answer:
        return await self._whole(calls.show(model))

    # -- many at once ---------------------------------------------------------------------------

    async def gather(
        self, *calls_: Awaitable[T], concurrency: int = 4
    ) -> builtins.list[T | BaseException]:
        """Await `calls_` at most `concurrency` at a time; results in order, each failure as
        its exception in its place (one failing call does not cancel the others). A stream is
        only created here; it is sent when iterated, outside this bound."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        limit = asyncio.Semaphore(concurrency)

        async def one(call: Awaitable[T]) -> T:
            async with limit:
                return await call

        return await asyncio.gather(*(one(c) for c in calls_), return_exceptions=True)

    async def map(
        self,
        function: Callable[[Item], Awaitable[T]],
        items: Iterable[Item],
        *,
        concurrency: int = 4,
    ) -> builtins.list[T | BaseException]:
        """`function(item)` for every item, at most `concurrency` at a time, in order."""
        return await self.gather(*(function(item) for item in items), concurrency=concurrency)

    # -- the pieces -----------------------------------------------------------------------------

    async def _call(self, call: Call) -> Answer | AsyncIterator[Answer]:
        # A stream is sent when iterated, as the official client does: a stream never iterated
        # holds no connection.
        return self._stream(call) if call.stream else await self._whole(call)

    async def _whole(self, call: Call) -> Answer:
        reply = await self._open(call)
        try:
            with transport_errors(str(reply.url)):
                return calls.answer(await reply.aread())
        finally:
            await reply.aclose()

    async def _stream(self, call: Call) -> AsyncIterator[Answer]:
        reply = await self._open(call)  # retries end here: what follows is the answer itself
        try:
            with transport_errors(str(reply.url)):
                async for line in reply.aiter_lines():
                    if (part := calls.chunk(line.encode())) is not None:
                        yield part
        finally:
            await reply.aclose()

    async def _open(self, call: Call) -> httpx.Response:
        """As `Client._open`, awaited."""
        self._start_checker()
        attempts = Attempts(self.endpoints, self.options.retry, time.monotonic(), self._rng)
        last: Exception = UnreachableError("no endpoint was tried")
        while True:
            try:
                url, wait = attempts.next(time.monotonic())
            except OutOfTries:
                raise last from None
            if wait:
                await asyncio.sleep(wait)
            request = self._http.build_request(
                call.method, url + call.path, content=call.body or None
            )
            try:
                reply = await self._http.send(request, stream=True)
            except self.options.retryable_errors as exc:
                attempts.failed(url, time.monotonic())
                last = UnreachableError(f"{url}: {exc or type(exc).__name__}")
                continue
            except httpx.HTTPError as exc:
                raise TransportError(f"{url}: {exc or type(exc).__name__}") from exc
            retry_after = reply.headers.get("Retry-After")
            retry = attempts.answered(url, reply.status_code, retry_after, time.monotonic())
            if reply.status_code < 400 and not retry:
                return reply
            with transport_errors(url):
                await reply.aread()
            await reply.aclose()
            error = calls.error_of(reply.status_code, reply.content)
            if not retry:
                raise error
            last = error

    def _start_checker(self) -> None:
        if self._checker is None and len(self.endpoints.urls) > 1:
            self._checker = asyncio.get_running_loop().create_task(self._recheck())

    async def _recheck(self) -> None:
        """While the client lives: ask each endpoint with an open breaker whether it is back."""
        while True:
            await asyncio.sleep(self.options.recheck_interval)
            for url in self.endpoints.open():
                try:
                    reply = await self._http.get(url + calls.VERSION.path, timeout=2.0)
                except httpx.HTTPError:
                    continue
                if reply.status_code < 500:
                    self.endpoints.succeeded(url)
