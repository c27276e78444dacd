"""`parallama serve`: the gateway's HTTP side around the sans-I/O scheduler.

Requests are read, inspected (model, stream, client, priority), queued in the scheduler, and
forwarded to the backend it binds them to over that backend's pooled keep-alive connections
(`upstream.py`).
Answers are relayed as they arrive, chunk by chunk, without being parsed; only the last few
kilobytes are kept, for the token counts at their end. A client that goes away leaves the queue
or, mid-answer, closes the upstream request so the backend's slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from parallama import __version__
from parallama.alarm import Alarm
from parallama.config import GatewaySettings
from parallama.core.scheduler import (
    Backend,
    NoBackendError,
    Outcome,
    QueueFullError,
    Scheduler,
    Ticket,
)
from parallama.errors import ApiError
from parallama.gateway.exchange import Exchange
from parallama.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from parallama.gateway.upstream import Headers, Upstream, UpstreamError, UpstreamTimeout
from parallama.protocol import ollama, openai
from parallama.protocol.inspect import (
    STREAM_DEFAULTS,
    Dialect,
    RequestInfo,
    dialect_of,
    error_body,
    inspect_request,
)
from parallama.protocol.usage import TAIL_BYTES, keep_tail, usage_from_tail
from parallama.runtime import http_url

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EXCHANGE = web.RequestKey("exchange", Exchange)
access_log = logging.getLogger("parallama.access")
log = logging.getLogger("parallama.gateway")
# Headers a proxy must not pass on (hop-by-hop), plus the framing each side sets itself.
_HOP_HEADERS = frozenset(
    h.lower().encode()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",
        "Host",
        "Content-Length",
    )
)


def _passable(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]


def _relayable(headers: Headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in _passable(headers)]


def _error(
    dialect: Dialect, status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = error_body(dialect, status, message)
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


def _error_chunk(content_type: str, message: str) -> bytes | None:
    """How a stream that already began says it failed: Ollama's `{"error": ...}` line (which
    its clients raise), or an SSE event with the OpenAI error object."""
    if content_type.startswith(ollama.NDJSON):
        return ollama.error_body(message) + b"\n"
    if content_type.startswith(openai.EVENT_STREAM):
        return b"data: " + openai.error_body(502, message) + b"\n\n"
    return None


class _ClientGone(Exception):
    """Writing to the client failed: it left, and the backend is not to blame."""


async def _to_client(write: Awaitable[object]) -> None:
    try:
        await write
    except ConnectionError as exc:
        raise _ClientGone from exc


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.scheduler = Scheduler(settings.scheduler, time.monotonic)
        for backend in settings.backends:
            self.scheduler.add_backend(
                Backend(
                    backend.url,
                    slots=settings.slots_of(backend),
                    weight=backend.weight,
                    models=backend.models,
                )
            )
        self.metrics = GatewayMetrics(self.scheduler)
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._alarm = Alarm(self._on_alarm)
        self._upstreams: dict[str, Upstream] = {}
        self._runner: web.AppRunner | None = None
        self.port = settings.port

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return http_url(self.settings.host, self.port)

    def make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes, middlewares=[self._edge]
        )
        for path in STREAM_DEFAULTS:
            app.router.add_post(path, self.proxy)
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/parallama/status", self.status)
        return app

    async def start(self) -> None:
        # Like nginx's proxy_read_timeout: a backend may be silent this long, before its first
        # byte or between two chunks; a stream that keeps flowing may take as long as it needs.
        self._upstreams = {
            b.url: Upstream(
                b.url,
                connect_timeout=self.settings.connect_timeout,
                read_timeout=self.settings.request_timeout,
            )
            for b in self.settings.backends
        }
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port, when 0 was asked for

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for upstream in self._upstreams.values():
            await upstream.close()
        self._alarm.cancel()

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer in the API's own dialect, and one record per request."""
        exchange = Exchange(
            request.method, request.path, f"addr:{request.remote}", time.monotonic()
        )
        request[EXCHANGE] = exchange
        try:
            response = await self._answer(request, handler, exchange)
            exchange.status = exchange.status or response.status
            return response
        except BaseException as exc:
            # 499, as nginx logs it: the client closed the connection before the answer ended.
            exchange.status = exchange.status or (
                499 if isinstance(exc, asyncio.CancelledError) else 500
            )
            raise
        finally:
            exchange.finished_at = time.monotonic()
            self._record(exchange)

    async def _answer(
        self, request: web.Request, handler: Handler, exchange: Exchange
    ) -> web.StreamResponse:
        dialect = dialect_of(request.path)
        try:
            return await handler(request)
        except ApiError as exc:
            exchange.error = exc.message
            return _error(dialect, exc.status, exc.message, exc.headers)
        except web.HTTPNotFound:
            return _error(dialect, 404, f"no route {request.method} {request.path}")
        except web.HTTPMethodNotAllowed:
            return _error(dialect, 405, f"method {request.method} not allowed on {request.path}")

    def _record(self, exchange: Exchange) -> None:
        self.metrics.observe(exchange)
        if not self.settings.log_requests:
            return
        # Model routes are the traffic; scrapes and listings would drown them at info level.
        level = logging.INFO if exchange.model is not None else logging.DEBUG
        if access_log.isEnabledFor(level):
            access_log.log(level, "request", extra={"fields": exchange.log_fields()})

    # -- routes ---------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text=ollama.ROOT_TEXT)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": __version__})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def status(self, request: web.Request) -> web.Response:
        """The seed's `get_stats` (total, completed, rejected, timeout, queue_size, active),
        every outcome, and each backend's state."""
        s = self.scheduler
        counts = s.accounting()
        backends = [
            {
                "url": b.name,
                "healthy": b.healthy,
                "slots": b.slots,
                "weight": b.weight,
                "models": sorted(b.models) if b.models is not None else None,
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
            "queues": s.queue_depths(),
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
        target = path.encode()

        async def ask(base: str) -> Any:
            reply = None
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    reply = await self._upstreams[base].send(b"GET", target, [], b"")
                    body = await reply.read()
                return orjson.loads(body) if reply.status == 200 else None
            except (UpstreamError, TimeoutError, orjson.JSONDecodeError):
                return None
            finally:
                if reply is not None:
                    reply.release()

        healthy = [b.name for b in self.scheduler.backends.values() if b.healthy]
        answers = await asyncio.gather(*(ask(base) for base in healthy))
        return [answer for answer in answers if isinstance(answer, dict)]

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        exchange = request[EXCHANGE]
        body, info = await self._read(request, exchange)
        exchange.model, exchange.stream, exchange.client = info.model, info.stream, info.client
        async with self._admitted(info, exchange) as ticket:
            return await self._forward(request, body, info, ticket, exchange)

    # -- the pieces -----------------------------------------------------------------------------

    async def _read(self, request: web.Request, exchange: Exchange) -> tuple[bytes, RequestInfo]:
        """The body and what routing needs of it; bad input is counted as rejected."""
        try:
            body = await request.read()
            info = inspect_request(request.path, body, request.headers, request.remote or "")
        except (web.HTTPRequestEntityTooLarge, ApiError) as exc:
            self.scheduler.refuse()
            exchange.outcome = Outcome.REJECTED.value
            if isinstance(exc, ApiError):
                raise
            limit = self.settings.max_body_bytes
            raise ApiError(413, f"request body is larger than {limit} bytes") from None
        return body, info

    @contextlib.asynccontextmanager
    async def _admitted(self, info: RequestInfo, exchange: Exchange) -> AsyncIterator[Ticket]:
        """Wait in the gateway's queue until the scheduler binds the request to a backend."""
        model = info.model
        try:
            ticket = self.scheduler.submit(model, client=info.client, priority=info.priority)
        except QueueFullError as full:
            exchange.outcome = Outcome.REJECTED.value
            retry = str(int(full.retry_after))
            message = f"{full}: try again in {retry} s"
            raise ApiError(503, message, {"Retry-After": retry}) from None
        except NoBackendError:
            exchange.outcome = Outcome.REJECTED.value
            raise ApiError(404, ollama.model_not_found(model)) from None
        try:
            if ticket.backend is None:
                future = asyncio.get_running_loop().create_future()
                self._waiters[ticket] = future
                self._changed()
                await future
            if ticket.outcome is Outcome.TIMED_OUT:
                retry = str(int(self.scheduler.retry_after(model)))
                waited = self.settings.queue_timeout
                message = f"timed out after {waited:g} s waiting in the queue"
                raise ApiError(503, message, {"Retry-After": retry})
            yield ticket
        finally:
            self._waiters.pop(ticket, None)
            if ticket.outcome is None:  # cancelled, or an error escaped
                self.scheduler.cancel(ticket)
            self._changed()
            assert ticket.outcome is not None
            exchange.outcome = ticket.outcome.value
            waited_until = ticket.dispatched_at or time.monotonic()
            exchange.queue_seconds = waited_until - ticket.arrived_at

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        info: RequestInfo,
        ticket: Ticket,
        exchange: Exchange,
    ) -> web.StreamResponse:
        assert ticket.backend is not None
        base = exchange.backend = ticket.backend.name
        response: web.StreamResponse | None = None
        reply = None
        tail = b""
        try:
            reply = await self._upstreams[base].send(
                b"POST", request.raw_path.encode(), _passable(request.raw_headers), body
            )
            exchange.status = status = reply.status
            headers = _relayable(reply.headers)
            if not info.stream:  # one answer: relay it whole, with its length
                whole = await reply.read()
                tail = whole[-TAIL_BYTES:]
                response = web.Response(body=whole, status=status, headers=headers)
            else:
                response = web.StreamResponse(status=status, headers=headers)
                await _to_client(response.prepare(request))
                while (chunk := await reply.next_chunk()) is not None:
                    if exchange.first_byte_at is None:
                        exchange.first_byte_at = time.monotonic()
                    tail = keep_tail(tail, chunk)
                    await _to_client(response.write(chunk))
                await _to_client(response.write_eof())
        except _ClientGone:
            assert response is not None
            self.scheduler.cancel(ticket)  # frees the slot; closing upstream stops the work
            exchange.status = 499
            return response  # aiohttp closes the broken connection quietly
        except UpstreamError as exc:
            self.scheduler.release(ticket, Outcome.FAILED)
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            reason = exchange.error = f"backend {base} {exc}"
            log.warning("backend failed", extra={"fields": {"backend": base, "error": reason}})
            if response is None:
                return _error(info.dialect, status, reason)
            last_words = _error_chunk(response.content_type, reason)
            if last_words is None:
                raise  # a whole answer cut in the middle: only closing the connection says so
            await response.write(last_words)
            await response.write_eof()
            return response
        finally:
            if reply is not None:
                reply.release()  # back to the pool, or closed if the answer did not end
        if status == 200:
            exchange.usage = usage_from_tail(tail)
        self.scheduler.release(ticket, Outcome.COMPLETED if status < 500 else Outcome.FAILED)
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
