"""`Client`: the Ollama API from ordinary (threaded) Python code."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import httpx
from typing_extensions import Unpack

from parallama.client import calls
from parallama.client.calls import Answer, Call, ChatFields, EmbedFields, GenerateFields
from parallama.client.errors import TransportError, UnreachableError, transport_errors
from parallama.client.options import ClientSettings, Options
from parallama.client.retry import Attempts, OutOfTries


class Client:
    """A pooled, retrying client for one or several Ollama-API servers (parallama's gateway,
    `ollama serve`, the emulator). See `Options` for what each setting does."""

    def __init__(
        self,
        host: str | Sequence[str] | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **settings: Unpack[ClientSettings],
    ) -> None:
        """`host`: one base URL or several; none: `OLLAMA_HOST`, else 127.0.0.1:11434.
        `transport`: httpx's, for tests (an `httpx.MockTransport`)."""
        self.options = Options.of(host, **settings)
        self.endpoints = self.options.endpoints()
        self._http = httpx.Client(
            timeout=self.options.timeout,
            limits=self.options.limits,
            headers=self.options.headers,
            transport=transport,
        )
        self._rng = random.Random()
        self._closed = threading.Event()
        self._checker: threading.Thread | None = None
        if len(self.endpoints.urls) > 1:
            self._checker = threading.Thread(target=self._recheck, daemon=True)
            self._checker.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._checker is not None:
            self._checker.join()
        self._http.close()

    # -- the API --------------------------------------------------------------------------------

    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = ...,
        *,
        stream: Literal[False] = ...,
        **fields: Unpack[ChatFields],
    ) -> Answer: ...
    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = ...,
        *,
        stream: Literal[True],
        **fields: Unpack[ChatFields],
    ) -> Iterator[Answer]: ...
    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[ChatFields],
    ) -> Answer | Iterator[Answer]:
        return self._call(calls.chat(model, messages, stream=stream, **fields))

    @overload
    def generate(
        self,
        model: str,
        prompt: str = ...,
        *,
        stream: Literal[False] = ...,
        **fields: Unpack[GenerateFields],
    ) -> Answer: ...
    @overload
    def generate(
        self,
        model: str,
        prompt: str = ...,
        *,
        stream: Literal[True],
        **fields: Unpack[GenerateFields],
    ) -> Iterator[Answer]: ...
    def generate(
        self,
        model: str,
        prompt: str = "",
        *,
        stream: bool = False,
        **fields: Unpack[GenerateFields],
    ) -> Answer | Iterator[Answer]:
        return self._call(calls.generate(model, prompt, stream=stream, **fields))

    def embed(
        self, model: str, input: str | Sequence[str] = "", **fields: Unpack[EmbedFields]
    ) -> Answer:
        return self._whole(calls.embed(model, input, **fields))

    def list(self) -> Answer:
        return self._whole(calls.LIST)

    def ps(self) -> Answer:
        return self._whole(calls.PS)

    def show(self, model: str) -> Answer:
        return self._whole(calls.show(model))

    # -- the pieces -----------------------------------------------------------------------------

    def _call(self, call: Call) -> Answer | Iterator[Answer]:
        return self._stream(call) if call.stream else self._whole(call)

    def _whole(self, call: Call) -> Answer:
        reply = self._open(call)
        try:
            with transport_errors(str(reply.url)):
                return calls.answer(reply.read())
        finally:
            reply.close()

    def _stream(self, call: Call) -> Iterator[Answer]:
        reply = self._open(call)  # retries end here: what follows is the answer itself
        try:
            with transport_errors(str(reply.url)):
                for line in reply.iter_lines():
                    if (part := calls.chunk(line.encode())) is not None:
                        yield part
        finally:
            reply.close()

    def _open(self, call: Call) -> httpx.Response:
        """The answer's status and headers from the first endpoint that gives a usable one,
        retrying and failing over as `RetryPolicy` says; its body still to read."""
        attempts = Attempts(self.endpoints, self.options.retry, time.monotonic(), self._rng)
        last: Exception = UnreachableError("no endpoint was tried")
        while True:
            try:
                url, wait = attempts.next(time.monotonic())
            except OutOfTries:
                raise last from None
            if wait:
                time.sleep(wait)
            request = self._http.build_request(
                call.method, url + call.path, content=call.body or None
            )
            try:
                reply = self._http.send(request, stream=True)
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
                reply.read()
            reply.close()
            error = calls.error_of(reply.status_code, reply.content)
            if not retry:
                raise error
            last = error

    def _recheck(self) -> None:
        """While the client lives: ask each endpoint with an open breaker whether it is back."""
        while not self._closed.wait(self.options.recheck_interval):
            for url in self.endpoints.open():
                try:
                    reply = self._http.get(url + calls.VERSION.path, timeout=2.0)
                except httpx.HTTPError:
                    continue
                if reply.status_code < 500:
                    self.endpoints.succeeded(url)
