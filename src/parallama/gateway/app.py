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
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from parallama import __version__
from parallama.config import GatewaySettings
from parallama.core.forwarding import Failure, Forwarding
from parallama.core.scheduler import (
    NoBackendError,
    Outcome,
    QueueFullError,
    Scheduler,
    Ticket,
    UnavailableError,
)
from parallama.errors import ApiError, ConfigError, excerpt
from parallama.gateway.exchange import Exchange
from parallama.gateway.fleet import Fleet
from parallama.gateway.guard import ConnectionLimits, Connections, GuardedSite, usable_connections
from parallama.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from parallama.gateway.relay import PassThrough, Relay, Translating, passable
from parallama.gateway.upstream import Connection, Headers, UpstreamError, UpstreamTimeout
from parallama.gateway.waiting import Waiting
from parallama.protocol import ollama, openai
from parallama.protocol.hosts import host_of, local_host, loopback_only
from parallama.protocol.inspect import (
    STREAM_DEFAULTS,
    Dialect,
    RequestInfo,
    dialect_of,
    error_body,
    inspect_request,
    with_model,
)
from parallama.protocol.ollama import normalize_name
from parallama.protocol.translate import BadAnswer, ollama_request
from parallama.protocol.usage import TAIL_BYTES, keep_tail, usage_from_tail
from parallama.runtime import http_url

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EXCHANGE = web.RequestKey("exchange", Exchange)
access_log = logging.getLogger("parallama.access")
log = logging.getLogger("parallama.gateway")


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


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class _Outbound:
    """What is sent to whichever backend takes the request."""

    path: str
    target: bytes  # the path with its query, as the client sent it
    headers: Headers
    body: bytes
    info: RequestInfo


class _ClientGone(Exception):
    """Writing to the client failed: it left, and the backend is not to blame."""


async def _to_client(write: Awaitable[object]) -> None:
    try:
        await write
    except ConnectionError as exc:
        raise _ClientGone from exc


async def _stream(
    request: web.Request,
    reply: Connection,
    relay: Relay,
    response: web.StreamResponse,
    exchange: Exchange,
) -> bytes:
    """Relay the answer chunk by chunk as it comes; return its last few kilobytes.

    The status line goes out with the first bytes for the client, not before: until then a
    backend that fails can still be replaced by another (a translated stream may begin with
    chunks that carry nothing for the client)."""
    tail = b""
    while (data := await reply.next_chunk()) is not None:
        if chunk := relay.chunk(data):
            if exchange.first_byte_at is None:
                exchange.first_byte_at = time.monotonic()
                await _to_client(response.prepare(request))
            tail = keep_tail(tail, chunk)
            await _to_client(response.write(chunk))
    if not response.prepared:
        await _to_client(response.prepare(request))
    if last := relay.end():
        tail = keep_tail(tail, last)
        await _to_client(response.write(last))
    await _to_client(response.write_eof())
    return tail


class _Failover(Exception):
    """The attempt failed before a byte reached the client: another backend may try."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class Gateway:
    def __init__(
        self, settings: GatewaySettings, reload: Callable[[], GatewaySettings] | None = None
    ) -> None:
        """`reload` reads the settings again (from the same file, environment and flags): what
        SIGHUP and `POST /parallama/reload` apply."""
        self.settings = settings
        self._aliases = settings.aliases
        self._reload = reload
        self.scheduler = Scheduler(settings.scheduler, time.monotonic)
        self.fleet = Fleet(self.scheduler, settings, self._changed)
        self.connections = Connections(self._connection_limits(settings))
        self.metrics = GatewayMetrics(self.scheduler, self.connections)
        self._waiting = Waiting(self.scheduler)
        self._runner: web.AppRunner | None = None
        self.port = settings.port
        # The DNS-rebinding guard applies when only this machine can connect (as Ollama's).
        self._check_host = loopback_only(settings.host)
        self._local_hosts: set[str] = set()  # Host headers found local: checked once
        # More of /parallama/status, e.g. the engine processes `parallama up` supervises.
        self.status_sections: dict[str, Callable[[], Any]] = {}

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
        app.router.add_post("/parallama/reload", self.reload)
        return app

    @staticmethod
    def _connection_limits(
        settings: GatewaySettings, max_connections: int | None = None
    ) -> ConnectionLimits:
        """`max_connections`: the one already in force (a reload keeps it)."""
        return ConnectionLimits(
            header_timeout=settings.header_timeout,
            send_timeout=settings.send_timeout,
            max_connections=max_connections or usable_connections(settings.max_connections),
        )

    async def start(self) -> None:
        await self.fleet.start()
        self._runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=self.settings.idle_timeout,
        )
        await self._runner.setup()
        site = GuardedSite(self._runner, self.settings.host, self.settings.port, self.connections)
        await site.start()
        self.port = site.port  # the bound port, when 0 was asked for

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.fleet.stop()
        self._waiting.close()

    def reconfigure(self, settings: GatewaySettings) -> list[str]:
        """Apply new settings while requests flow; return what changed. The address and the
        log settings are read at start only."""
        fixed = ("host", "port", "log_format", "log_level", "idle_timeout", "max_connections")
        ignored = [k for k in fixed if getattr(settings, k) != getattr(self.settings, k)]
        settings = settings.model_copy(update={k: getattr(self.settings, k) for k in fixed})
        changes = self.fleet.apply(settings)
        self.settings = settings
        self._aliases = settings.aliases
        running = self.connections.limits.max_connections
        self.connections.limits = self._connection_limits(settings, running)
        self._local_hosts.clear()  # allowed_hosts may have changed
        changes += [f"{k} needs a restart: kept" for k in ignored]
        log.info("reloaded", extra={"fields": {"changes": "; ".join(changes) or "none"}})
        return changes

    def reload_settings(self) -> list[str]:
        """Read the settings again and apply them; `ConfigError` leaves the running ones."""
        if self._reload is None:
            raise ConfigError("the gateway was not started from settings it can read again")
        return self.reconfigure(self._reload())

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer in the API's own dialect, and one record per request."""
        exchange = Exchange(
            request.method, request.path, f"addr:{request.remote}", time.monotonic()
        )
        request[EXCHANGE] = exchange
        transport = request.transport
        self.connections.request_began(transport)
        try:
            response = await self._answer(request, handler, exchange)
            exchange.status = exchange.status or response.status
            if not response.prepared:  # written here, so that "answered" means written
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    exchange.status = 499  # gone before its answer was written: aiohttp
            return response  # closes the broken connection quietly
        except BaseException as exc:
            # 499, as nginx logs it: the client closed the connection before the answer ended.
            exchange.status = exchange.status or (
                499 if isinstance(exc, asyncio.CancelledError) else 500
            )
            raise
        finally:
            body_read = request.content.at_eof()
            self.connections.request_ended(transport, body_read=body_read)
            exchange.finished_at = time.monotonic()
            self._record(exchange)

    async def _answer(
        self, request: web.Request, handler: Handler, exchange: Exchange
    ) -> web.StreamResponse:
        dialect = dialect_of(request.path)
        try:
            self._check_host_header(request)
            return await handler(request)
        except ApiError as exc:
            exchange.error = exc.message
            return _error(dialect, exc.status, exc.message, exc.headers)
        except web.HTTPNotFound:
            return _error(dialect, 404, f"no route {request.method} {excerpt(request.path)}")
        except web.HTTPMethodNotAllowed:
            path = excerpt(request.path)
            return _error(dialect, 405, f"method {request.method} not allowed on {path}")

    def _check_host_header(self, request: web.Request) -> None:
        """Ollama's guard against DNS rebinding, kept for the Ollama behind the gateway: while
        the gateway listens on loopback only, a request naming another host is refused (a web
        page whose name now points at 127.0.0.1 must not reach the models)."""
        if not self._check_host:
            return
        header = request.headers.get("Host", "")
        if header in self._local_hosts:
            return
        if local_host(header, self.settings.allowed_hosts):
            if len(self._local_hosts) < 64:  # the few names clients use, not all they could
                self._local_hosts.add(header)
            return
        host = excerpt(host_of(header))
        raise ApiError(
            403,
            f"host {host!r} is not allowed: the gateway listens on loopback only and serves "
            "local names (a guard against DNS rebinding); add it to allowed_hosts to serve it",
        )

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
                "breaker": b.breaker.state.value,
                "draining": b.draining,
                "online": b.online,
                "slots": b.slots,
                "capacity": b.capacity,
                "weight": b.weight,
                "models": sorted(b.models) if b.models is not None else None,
                "installed": sorted(b.inventory) if b.inventory is not None else None,
                "loaded": sorted(b.loaded),
                "active": b.active,
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
            "routing": self.settings.routing,
            "backends": backends,
            **{name: section() for name, section in self.status_sections.items()},
        }
        return _json(payload)

    async def reload(self, request: web.Request) -> web.Response:
        """`POST /parallama/reload`: what SIGHUP does, with the outcome in the answer."""
        self._authorize_admin(request)
        try:
            changes = self.reload_settings()
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        return _json({"reloaded": True, "changes": changes})

    def _authorize_admin(self, request: web.Request) -> None:
        token = self.settings.admin_token
        if token is None:
            if not _is_loopback(request.remote):
                raise ApiError(
                    403, "admin routes: loopback clients only, unless admin_token is set"
                )
            return
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "admin routes need Authorization: Bearer <admin_token>")

    async def tags(self, request: web.Request) -> web.Response:
        """Installed models: the union over healthy backends, first answer wins per name."""
        answers = [*await self._ask_all("/api/tags"), self._served_rows(expires=False)]
        return _json({"models": _union(answers, "models", "name")})

    async def ps(self, request: web.Request) -> web.Response:
        """Loaded models over all backends, latest expiry first as Ollama sorts them."""
        answers = [*await self._ask_all("/api/ps"), self._served_rows(expires=True)]
        rows = _union(answers, "models", "name", latest="expires_at")
        rows.sort(key=lambda row: str(row.get("expires_at", "")), reverse=True)
        return _json({"models": rows})

    async def models(self, request: web.Request) -> web.Response:
        answers = await self._ask_all("/v1/models", dialects=("ollama", "openai"))
        return _json({"object": "list", "data": _union(answers, "data", "id")})

    async def _ask_all(
        self, path: str, dialects: tuple[Dialect, ...] = ("ollama",)
    ) -> list[dict[str, Any]]:
        """GET `path` from every healthy backend of those dialects at once; a backend that fails
        is left out."""
        target, timeout = path.encode(), self.settings.connect_timeout
        asked = [
            b.name
            for b in self.scheduler.backends.values()
            if b.healthy and self.fleet.dialect(b.name) in dialects
        ]
        answers = await asyncio.gather(
            *(self.fleet.upstreams[base].get_json(target, timeout) for base in asked)
        )
        return [answer for answer in answers if isinstance(answer, dict)]

    def _served_rows(self, *, expires: bool) -> dict[str, Any]:
        """What the healthy OpenAI-dialect engines serve, as `/api/tags` (or `/api/ps`) rows,
        from the probes' last look: asking them now could wait behind a generation (llama.cpp's
        Python server answers one request at a time, listings included)."""
        names = {
            name
            for b in self.scheduler.backends.values()
            if b.healthy and self.fleet.dialect(b.name) == "openai"
            for name in b.inventory or ()
        }
        return {"models": [ollama.served_model(name, expires=expires) for name in sorted(names)]}

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        exchange = request[EXCHANGE]
        body, info = await self._read(request, exchange)
        model = normalize_name(info.model)
        target = self._aliases.get(model)
        if target is not None:
            body, model = with_model(body, target), target
        exchange.model, exchange.stream, exchange.client = model, info.stream, info.client
        async with self._admitted(info, model, exchange) as ticket:
            return await self._forward(request, body, info, ticket, exchange)

    # -- the pieces -----------------------------------------------------------------------------

    async def _read(self, request: web.Request, exchange: Exchange) -> tuple[bytes, RequestInfo]:
        """The body and what routing needs of it; bad input is counted as rejected."""
        try:
            body = await self._body(request)
            info = inspect_request(request.path, body, request.headers, request.remote or "")
        except ApiError:
            self.scheduler.refuse()
            exchange.outcome = Outcome.REJECTED.value
            raise
        return body, info

    async def _body(self, request: web.Request) -> bytes:
        """The request body, at most `max_body_bytes` (413), from a client that never pauses
        longer than `body_timeout` while sending it (408), like nginx's client_body_timeout."""
        limit, pause = self.settings.max_body_bytes, self.settings.body_timeout
        too_large = ApiError(413, f"request body is larger than {limit} bytes")
        if (request.content_length or 0) > limit:
            raise too_large
        content = request.content
        parts = [content.read_nowait()]  # usually the whole body: it came with the head
        size = len(parts[0])
        if size > limit:  # a chunked body says no length up front
            raise too_large
        while not content.at_eof():
            try:
                async with asyncio.timeout(pause):
                    part = await content.readany()
            except TimeoutError:
                message = f"the request body stopped arriving for {pause:g} s"
                raise ApiError(408, message) from None
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @contextlib.asynccontextmanager
    async def _admitted(
        self, info: RequestInfo, model: str, exchange: Exchange
    ) -> AsyncIterator[Ticket]:
        """Wait in the gateway's queue until the scheduler binds the request to a backend."""
        try:
            affine = self.scheduler.policy(model) == "session-affinity"
            ticket = self.scheduler.submit(
                model,
                client=info.client,
                priority=info.priority,
                session=info.session if affine else "",  # hashed only when it is used
            )
        except (QueueFullError, UnavailableError) as refused:
            exchange.outcome = Outcome.REJECTED.value
            retry = str(int(refused.retry_after))
            message = f"{refused}: try again in {retry} s"
            raise ApiError(503, message, {"Retry-After": retry}) from None
        except NoBackendError:
            exchange.outcome = Outcome.REJECTED.value
            raise ApiError(404, ollama.model_not_found(info.model)) from None
        try:
            await self._bound(ticket)
            yield ticket
        finally:
            if ticket.outcome is None:  # cancelled, or an error escaped
                self.scheduler.cancel(ticket)
            self._changed()
            assert ticket.outcome is not None
            exchange.outcome = ticket.outcome.value
            exchange.queue_seconds = ticket.queue_seconds(time.monotonic())

    async def _bound(self, ticket: Ticket) -> None:
        """Until the ticket has a backend; 503 if it waited longer than the queue allows."""
        await self._waiting.until_bound(ticket)
        if ticket.outcome is Outcome.TIMED_OUT:
            retry = str(int(self.scheduler.retry_after(ticket.model)))
            waited = self.settings.queue_timeout
            message = f"timed out after {waited:g} s waiting in the queue"
            raise ApiError(503, message, {"Retry-After": retry})

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        info: RequestInfo,
        ticket: Ticket,
        exchange: Exchange,
    ) -> web.StreamResponse:
        """Try the bound backend; what happens next is `Forwarding`'s decision: before the
        first byte reached the client, a failed attempt may move to another backend, else the
        client gets a clear error."""
        outbound = _Outbound(
            request.path, request.raw_path.encode(), passable(request.raw_headers), body, info
        )
        forwarding = Forwarding(self.scheduler, ticket, self.settings.retries, self._changed)
        while True:
            try:
                return await self._attempt(request, outbound, forwarding, exchange)
            except _Failover as failed:
                exchange.error = failed.failure.reason
                left = forwarding.backend
                given_up = forwarding.failed(failed.failure)
                if given_up is not None:
                    exchange.status = given_up.status
                    return _error(info.dialect, given_up.status, given_up.message)
                self.metrics.failover(left)
                await self._bound(ticket)

    async def _attempt(
        self,
        request: web.Request,
        outbound: _Outbound,
        forwarding: Forwarding,
        exchange: Exchange,
    ) -> web.StreamResponse:
        base = exchange.backend = forwarding.backend
        relay = self._relay(outbound, forwarding, exchange)
        if relay.local is not None:  # nothing for the engine to do
            forwarding.ended(200)
            content_type = ollama.NDJSON if outbound.info.stream else "application/json"
            return web.Response(body=relay.local, content_type=content_type)
        response: web.StreamResponse | None = None
        reply = None
        tail = b""
        try:
            sent = relay.request_headers(outbound.headers)
            reply = await self.fleet.upstream(base).send(b"POST", relay.target, sent, relay.body)
            upstream_status = reply.status
            exchange.status = status = relay.status(upstream_status)
            if (elsewhere := forwarding.answered(status)) is not None:
                raise _Failover(elsewhere)
            headers = relay.headers(upstream_status, reply.headers)
            if not outbound.info.stream or upstream_status != 200:  # one answer: whole
                whole = relay.whole(upstream_status, await reply.read())
                tail = whole[-TAIL_BYTES:]
                response = web.Response(body=whole, status=status, headers=headers)
            else:
                response = web.StreamResponse(status=status, headers=headers)
                tail = await _stream(request, reply, relay, response, exchange)
        except _ClientGone:
            assert response is not None
            forwarding.left()
            exchange.status = 499
            return response  # aiohttp closes the broken connection quietly
        except (UpstreamError, BadAnswer) as exc:
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            reason = f"backend {base} {exc}"
            log.warning("backend failed", extra={"fields": {"backend": base, "error": reason}})
            if response is None or not response.prepared:
                # It answered, however badly (BadAnswer), or may have been working on it.
                worked_on = not isinstance(exc, UpstreamError) or exc.reached
                raise _Failover(Failure(status, reason, worked_on=worked_on)) from None
            exchange.error = reason
            forwarding.broke()
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
        forwarding.ended(status)
        return response

    def _relay(
        self, outbound: _Outbound, forwarding: Forwarding, exchange: Exchange
    ) -> Relay:
        """Bytes through, unless an Ollama request meets an OpenAI-dialect engine."""
        engine = self.fleet.dialect(forwarding.backend)
        if outbound.info.dialect == "openai" or engine == "ollama":
            return PassThrough(outbound.target, outbound.body, json_body=engine == "openai")
        arrived = time.time() - (time.monotonic() - exchange.started)
        try:
            translated = ollama_request(outbound.path, outbound.body, time.time())
        except ApiError:  # a request this engine's dialect cannot express
            forwarding.rejected()
            raise
        return Translating(translated, arrived)

    def _changed(self) -> None:
        """After any scheduler call: wake the requests it bound or timed out."""
        self._waiting.changed()
