"""`parallama serve`: the gateway's HTTP side around the sans-I/O scheduler.

Requests are read, inspected (model, stream, client, priority), queued in the scheduler, and
forwarded to the backend it binds them to over that backend's pooled keep-alive connections.
Answers are relayed as they arrive, chunk by chunk, without being parsed. A client that goes
away leaves the queue or, mid-answer, closes the upstream request so the backend's slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from parallama import __version__
from parallama.alarm import Alarm
from parallama.core.scheduler import (
    Backend,
    NoBackendError,
    Outcome,
    QueueFullError,
    Scheduler,
    SchedulerSettings,
    Ticket,
)
from parallama.errors import ApiError
from parallama.protocol import ollama
from parallama.protocol.inspect import STREAM_DEFAULTS, dialect_of, error_body, inspect_request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Headers a proxy must not pass on (hop-by-hop), plus those aiohttp sets itself.
_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)


@dataclass(frozen=True)
class BackendConfig:
    url: str
    slots: int = 1
    weight: float = 1.0
    models: frozenset[str] | None = None


@dataclass(frozen=True)
class GatewayConfig:
    backends: tuple[BackendConfig, ...]
    host: str = "127.0.0.1"
    port: int = 11500
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    request_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_body_bytes: int = 16 * 1024 * 1024


def _error(
    dialect: str, status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = error_body("openai" if dialect == "openai" else "ollama", status, message)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _union(
    answers: list[dict[str, Any]], list_key: str, id_key: str, *, latest: str | None = None
) -> list[dict[str, Any]]:
    """Merge the lists under `list_key`, one row per `id_key`; with `latest`, keep the row
    whose `latest` field is greatest (e.g. the latest `expires_at`)."""
    rows: dict[str, dict[str, Any]] = {}
    for answer in answers:
        entries = answer.get(list_key)
        for row in entries if isinstance(entries, list) else []:
            if not isinstance(row, dict) or not isinstance(row.get(id_key), str):
                continue
            kept = rows.get(row[id_key])
            if kept is None or (latest and str(row.get(latest, "")) > str(kept.get(latest, ""))):
                rows[row[id_key]] = row
    return list(rows.values())


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.scheduler = Scheduler(config.scheduler, time.monotonic)
        self.urls: dict[str, str] = {}
        for backend in config.backends:
            name = backend.url.rstrip("/")
            self.urls[name] = name
            self.scheduler.add_backend(
                Backend(name, slots=backend.slots, weight=backend.weight, models=backend.models)
            )
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._alarm = Alarm(self._on_alarm)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port = config.port

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[self._errors]
        )
        for path in STREAM_DEFAULTS:
            app.router.add_post(path, self.proxy)
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/parallama/status", self.status)
        return app

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(
            total=self.config.request_timeout, sock_connect=self.config.connect_timeout
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port, when 0 was asked for

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self._alarm.cancel()

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        dialect = dialect_of(request.path)
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(dialect, exc.status, exc.message, exc.headers)
        except web.HTTPRequestEntityTooLarge:
            limit = self.config.max_body_bytes
            return _error(dialect, 413, f"request body is larger than {limit} bytes")
        except web.HTTPNotFound:
            return _error(dialect, 404, f"no route {request.method} {request.path}")
        except web.HTTPMethodNotAllowed:
            return _error(dialect, 405, f"method {request.method} not allowed on {request.path}")

    # -- routes ---------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text=ollama.ROOT_TEXT)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": __version__})

    async def status(self, request: web.Request) -> web.Response:
        s = self.scheduler
        counts = s.accounting()
        backends = [
            {
                "url": b.name,
                "healthy": b.healthy,
                "slots": b.slots,
                "active": sum(b.in_flight.values()),
                "in_flight": dict(b.in_flight),
            }
            for b in s.backends.values()
        ]
        payload = {
            **counts,
            "timeout": counts["timed_out"],
            "queue_size": counts["queued"],
            "active": counts["in_flight"],
            "backends": backends,
        }
        return _json(payload)

    async def tags(self, request: web.Request) -> web.Response:
        """Installed models: the union over healthy backends, first answer wins per name."""
        rows = _union(await self._ask_all("/api/tags"), "models", "name")
        return _json({"models": rows})

    async def ps(self, request: web.Request) -> web.Response:
        """Loaded models over all backends, latest expiry first as Ollama sorts them."""
        rows = _union(await self._ask_all("/api/ps"), "models", "name", latest="expires_at")
        rows.sort(key=lambda row: str(row.get("expires_at", "")), reverse=True)
        return _json({"models": rows})

    async def models(self, request: web.Request) -> web.Response:
        return _json(
            {"object": "list", "data": _union(await self._ask_all("/v1/models"), "data", "id")}
        )

    async def _ask_all(self, path: str) -> list[dict[str, Any]]:
        """GET `path` from every healthy backend at once; a backend that fails is left out."""
        assert self._session is not None
        session = self._session
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout)

        async def ask(base: str) -> Any:
            try:
                async with session.get(base + path, timeout=timeout) as reply:
                    return await reply.json(content_type=None) if reply.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None

        healthy = [self.urls[b.name] for b in self.scheduler.backends.values() if b.healthy]
        answers = await asyncio.gather(*(ask(base) for base in healthy))
        return [answer for answer in answers if isinstance(answer, dict)]

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        info = inspect_request(request.path, body, request.headers, request.remote or "")
        async with self._admitted(info.model, info.client, info.priority) as ticket:
            backend = ticket.backend
            assert backend is not None
            return await self._forward(request, body, self.urls[backend.name], ticket)

    # -- the pieces -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admitted(self, model: str, client: str, priority: int) -> AsyncIterator[Ticket]:
        """Wait in the gateway's queue until the scheduler binds the request to a backend."""
        try:
            ticket = self.scheduler.submit(model, client=client, priority=priority)
        except QueueFullError as full:
            retry = str(int(full.retry_after))
            message = f"{full}: try again in {retry} s"
            raise ApiError(503, message, {"Retry-After": retry}) from None
        except NoBackendError:
            raise ApiError(404, f"model '{model}' not found") from None
        try:
            if ticket.backend is None:
                future = asyncio.get_running_loop().create_future()
                self._waiters[ticket] = future
                self._changed()
                await future
            if ticket.outcome is Outcome.TIMED_OUT:
                retry = str(int(self.scheduler.retry_after(model)))
                waited = self.config.scheduler.queue_timeout
                message = f"timed out after {waited:g} s waiting in the queue"
                raise ApiError(503, message, {"Retry-After": retry})
            yield ticket
        finally:
            self._waiters.pop(ticket, None)
            if ticket.outcome is None:  # cancelled, or an error escaped
                self.scheduler.cancel(ticket)
            self._changed()

    async def _forward(
        self, request: web.Request, body: bytes, base: str, ticket: Ticket
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        dialect = dialect_of(request.path)
        response: web.StreamResponse | None = None
        try:
            async with self._session.post(
                base + request.path, data=body, headers=headers
            ) as upstream:
                reply_headers = {
                    k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS
                }
                response = web.StreamResponse(status=upstream.status, headers=reply_headers)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            self.scheduler.release(ticket, Outcome.FAILED)
            if response is not None:
                raise  # mid-answer: the client sees the stream cut; nothing can be added
            return _error(dialect, 502, f"backend {base} failed: {exc}")
        except TimeoutError:
            self.scheduler.release(ticket, Outcome.FAILED)
            if response is not None:
                raise
            limit = self.config.request_timeout
            return _error(dialect, 504, f"backend {base} did not answer within {limit:g} s")
        self.scheduler.release(
            ticket, Outcome.COMPLETED if upstream.status < 500 else Outcome.FAILED
        )
        return response

    def _changed(self) -> None:
        """After any scheduler call: wake dispatched and timed-out waiters, re-arm the timer."""
        s = self.scheduler
        for ticket in [*s.take_dispatched(), *s.take_timed_out()]:
            future = self._waiters.get(ticket)
            if future is not None and not future.done():
                future.set_result(None)
        self._alarm.set(s.next_wakeup())

    def _on_alarm(self) -> None:
        self.scheduler.tick()
        self._changed()
