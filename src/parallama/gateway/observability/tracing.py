"""OpenTelemetry traces of the model requests, sent to a collector as OTLP/HTTP JSON
(`otlp_endpoint`, e.g. `http://127.0.0.1:4318/v1/traces`; any OTLP collector, Jaeger or Tempo
takes it). The spans are made when a request ends (`core.trace`) and sent in batches, at least
once a second, by a task of their own: off the request path, in a bounded buffer (past it the
oldest spans go, counted), and a collector that is down costs a log line, not a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from parallama import __version__
from parallama.core.exchange import Exchange
from parallama.core.trace import Trace, begin, spans

log = logging.getLogger("parallama.tracing")

_BUFFER = 8192  # spans waiting to be sent
_BATCH = 512  # spans a request to the collector
_EVERY = 1.0  # seconds between sends, at most
_TIMEOUT = 5.0


class Tracing:
    def __init__(self, endpoint: str, sample: float) -> None:
        self._endpoint = endpoint
        self._sample = sample
        self._chance = random.Random()
        self._epoch = time.time() - time.monotonic()
        self._spans: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        self.sent = self.dropped = self.failed = 0

    def begin(self, headers: Mapping[str, str]) -> Trace | None:
        return begin(headers.get("traceparent"), self._sample, self._chance)

    def finish(self, exchange: Exchange) -> None:
        trace = exchange.trace
        if trace is None:
            return
        made = spans(trace, exchange, self._epoch)
        self._spans.extend(made)
        while len(self._spans) > _BUFFER:
            self._spans.popleft()
            self.dropped += 1
        if len(self._spans) >= _BATCH:
            self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        self._task = asyncio.create_task(self._send_forever(), name="parallama-tracing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_TIMEOUT):
                while self._spans:
                    if not await self._send():
                        break
        if self._session is not None:
            await self._session.close()

    async def _send_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EVERY):
                    await self._wake.wait()
            self._wake.clear()
            while self._spans and await self._send():
                pass

    async def _send(self) -> bool:
        """One batch to the collector: whether it took it (else the batch is dropped)."""
        assert self._session is not None
        batch = [self._spans.popleft() for _ in range(min(_BATCH, len(self._spans)))]
        body = {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [
                            {"key": "service.name", "value": {"stringValue": "parallama"}},
                            {"key": "service.version", "value": {"stringValue": __version__}},
                        ]
                    },
                    "scopeSpans": [
                        {"scope": {"name": "parallama", "version": __version__}, "spans": batch}
                    ],
                }
            ]
        }
        try:
            async with self._session.post(
                self._endpoint,
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as answer:
                await answer.read()
                if answer.status >= 300:
                    raise aiohttp.ClientResponseError(
                        answer.request_info, (), status=answer.status, message=answer.reason or ""
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.failed += len(batch)
            if not self._warned:
                log.warning(
                    "traces not sent: the collector did not take them (dropped; will try on)",
                    extra={"fields": {"endpoint": self._endpoint, "error": str(exc)}},
                )
                self._warned = True
            return False
        self.sent += len(batch)
        self._warned = False
        return True
