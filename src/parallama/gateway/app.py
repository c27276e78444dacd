"""`parallama serve`: the gateway, its routes and its life (start, reload, stop).

Each request gets one record (`Exchange`) from the moment its head arrived to its last byte,
one answer in its route's own dialect (`{"error": ...}` on Ollama routes, the OpenAI error
object on `/v1`) whatever goes wrong, and one line in the metrics and the access log. The
routes themselves are elsewhere: the model routes in `proxy.py`, the listings in `models/`,
the gateway's own routes in `admin.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from parallama.config import GatewaySettings
from parallama.core.exchange import Exchange
from parallama.core.scheduler import Scheduler
from parallama.errors import ApiError, ConfigError, excerpt
from parallama.gateway.admin import Admin
from parallama.gateway.fleet.backends import Fleet
from parallama.gateway.http.cors import Origins
from parallama.gateway.http.guard import ConnectionLimits, Connections, usable_connections
from parallama.gateway.http.listener import Listener
from parallama.gateway.http.server import ClientGone, Reply, Request, start_server
from parallama.gateway.models.blobs import PREFIX as BLOB_PREFIX
from parallama.gateway.models.blobs import FleetBlobs
from parallama.gateway.models.listings import Listings
from parallama.gateway.models.manage import ROUTES as MANAGEMENT_ROUTES
from parallama.gateway.models.manage import FleetModels
from parallama.gateway.observability.dashboard import Dashboard
from parallama.gateway.observability.metrics import GatewayMetrics
from parallama.gateway.proxy import Proxy, refuse
from parallama.gateway.waiting import Waiting
from parallama.protocol.hosts import host_of, local_host, loopback_only
from parallama.protocol.inspect import STREAM_DEFAULTS, api_key_of
from parallama.runtime import http_url
from parallama.teams.access import Access
from parallama.teams.store import Store

if TYPE_CHECKING:
    from parallama.gateway.observability.tracing import Tracing
    from parallama.gateway.shared.slots import SharedSlots

Route = Callable[[Request, Reply, Exchange], Awaitable[None]]
access_log = logging.getLogger("parallama.access")
_READ_AT_START = (
    *("host", "port", "listen_backlog", "log_format", "log_level", "max_connections"),
    *("state", "workers"),
    *("auth", "database", "ledger", "ledger_buffer", "otlp_endpoint", "trace_sample"),
)
log = logging.getLogger("parallama.gateway")
_MODEL_PREFIX = "/v1/models/"
_MODEL_PATH = _MODEL_PREFIX + "{model}"  # one model: the OpenAI SDK's models.retrieve
_BLOB_PATH = BLOB_PREFIX + "{digest}"


class Gateway:
    def __init__(
        self, settings: GatewaySettings, reload: Callable[[], GatewaySettings] | None = None
    ) -> None:
        """`reload` reads the settings again (from the same file, environment and flags): what
        SIGHUP and `POST /parallama/reload` apply."""
        self.settings = settings
        self._reload = reload
        self.scheduler = Scheduler(settings.scheduler, time.monotonic)
        self._waiting = Waiting(self.scheduler)
        self.fleet = Fleet(self.scheduler, settings, self._waiting.changed)
        self.connections = Connections(self._connection_limits(settings))
        self.metrics = GatewayMetrics(self.scheduler, self.connections)
        self.shared: SharedSlots | None = None
        if settings.state != "memory":  # the Redis client (and hiredis) imported only for it
            from parallama.gateway.shared.slots import SharedSlots

            self.shared = SharedSlots(settings.state, self.scheduler, self._waiting.changed)
            self._waiting.also = self.shared.changed
            self.metrics.registry.register(self.shared.collector())
        self.tracing: Tracing | None = None
        if settings.otlp_endpoint is not None:
            from parallama.gateway.observability.tracing import Tracing

            self.tracing = Tracing(settings.otlp_endpoint, settings.trace_sample)
        self.access = _access(settings)
        if self.access is not None:
            self.metrics.registry.register(self.access.collector())
        self._proxy = Proxy(self.scheduler, self.fleet, self._waiting, settings, self.access)
        self._listings = Listings(self.scheduler, self.fleet, settings)
        self.admin = admin = Admin(self)
        self.dashboard = dashboard = Dashboard(self)
        fleet_models = FleetModels(self)
        self.routes: dict[str, dict[str, Route]] = {
            "/": {"GET": admin.root},
            "/api/version": {"GET": admin.version},
            "/api/tags": {"GET": self._listings.tags},
            "/api/ps": {"GET": self._listings.ps},
            "/v1/models": {"GET": self._listings.models},
            _MODEL_PATH: {"GET": self._listings.model},
            "/v1/messages/count_tokens": {"POST": self._proxy.count_tokens},
            "/metrics": {"GET": admin.prometheus},
            "/parallama/status": {"GET": admin.status},
            "/parallama/live": {"GET": admin.live},
            "/parallama/ready": {"GET": admin.ready},
            "/parallama": {"GET": dashboard.page},
            "/parallama/": {"GET": dashboard.page},
            "/parallama/feed": {"GET": dashboard.feed},
            "/parallama/snapshot": {"GET": dashboard.snapshot},
            "/parallama/reload": {"POST": admin.reload},
            "/parallama/keys": {"GET": admin.keys, "POST": admin.keys},
            "/parallama/keys/revoke": {"POST": admin.revoke_key},
            "/parallama/usage": {"GET": admin.usage},
            **{path: {"POST": self._proxy} for path in STREAM_DEFAULTS},
            "/api/show": {"POST": self._proxy.show},  # no generation: it takes no slot
            **{path: {method: fleet_models} for path, method in MANAGEMENT_ROUTES.items()},
            _BLOB_PATH: dict.fromkeys(("HEAD", "POST"), FleetBlobs(self)),
        }
        # What needs an API key when keys are required: the models, not the gateway's own.
        self._keyed = {"/api/tags", "/api/ps", "/v1/models", *STREAM_DEFAULTS}
        self._keyed |= {_MODEL_PATH, "/v1/messages/count_tokens"}
        self._server: Listener | None = None
        self.port = settings.port
        # The DNS-rebinding guard applies when only this machine can connect (as Ollama's).
        self._check_host = loopback_only(settings.host)
        self._local_hosts: set[str] = set()  # Host headers found local: checked once
        self.origins = Origins(settings.allowed_origins)
        # More of /parallama/status, e.g. the engine processes `parallama up` supervises.
        self.status_sections: dict[str, Callable[[], Any]] = {}
        self.status_sections["warm_models"] = self.fleet.warmer.status
        if self.shared is not None:
            self.status_sections["fleet"] = self.shared.status

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return http_url(self.settings.host, self.port)

    @staticmethod
    def _connection_limits(
        settings: GatewaySettings, max_connections: int | None = None
    ) -> ConnectionLimits:
        """`max_connections`: the one already in force (a reload keeps it)."""
        return ConnectionLimits(
            header_timeout=settings.header_timeout,
            send_timeout=settings.send_timeout,
            max_connections=max_connections or usable_connections(settings.max_connections),
            body_timeout=settings.body_timeout,
            idle_timeout=settings.idle_timeout,
            max_body_bytes=settings.max_body_bytes,
            streamed_prefixes=(BLOB_PREFIX.encode(),),
        )

    async def start(self) -> None:
        if self.tracing is not None:
            await self.tracing.start()
        if self.shared is not None:
            await self.shared.start()
        if self.access is not None:
            await self.access.start()
        await self.fleet.start()
        self._server = server = await start_server(
            self.handle,
            self.connections,
            self.settings.host,
            self.settings.port,
            reuse_port=self.settings.workers > 1,  # the workers of `serve --workers N`
            backlog=self.settings.listen_backlog,
        )
        self.port = server.sockets[0].getsockname()[1]  # the bound port, when 0 was asked for

    def readiness(self) -> list[str]:
        """Why the gateway should take no traffic now; none: it can. A load balancer or a
        Kubernetes readiness probe sends elsewhere while there is a reason: stopping, no
        backend that can take work (all down, drained or offline), or, with shared state,
        Redis not answering (each gateway then has only its share of every backend's slots)."""
        reasons = []
        if self.connections.draining:
            reasons.append("stopping: the requests in flight are finishing")
        backends = self.scheduler.backends.values()
        if not any(b.healthy and not b.draining and (b.online or b.standby) for b in backends):
            reasons.append("no backend can take work: each is down, draining or offline")
        if self.shared is not None and not self.shared.up:
            reasons.append("the shared state (Redis) does not answer")
        return reasons

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Take no more work and let what is in flight finish, for at most `timeout` seconds
        (what is left then is cut by `stop`): the listening sockets close, so a balancer's
        next connection goes to another replica; idle keep-alive connections close; each
        answer still going out says `Connection: close` and its connection closes once it is
        written; requests waiting for a slot keep their place."""
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.connections.drain()  # says `draining` at once

    async def stop(self) -> None:
        """Stop listening, end the open connections (their requests are cancelled), and close
        the pools."""
        if self._server is not None:
            self._server.close()
            for transport in list(self.connections.open):
                cast(asyncio.Transport, transport).abort()
            await self._server.wait_closed()
            await asyncio.sleep(0)  # let the cancelled requests end
        await self.fleet.stop()
        self._waiting.close()
        if self.shared is not None:
            await self.shared.stop()  # the leases back at once, not after their TTL
        if self.access is not None:
            await self.access.stop()  # after the requests: their rows are in the ledger
        if self.tracing is not None:
            await self.tracing.stop()  # their spans too

    def reconfigure(self, settings: GatewaySettings) -> list[str]:
        """Apply new settings while requests flow; return what changed. The address, the log
        settings and those of keys and the ledger are read at start only."""
        fixed = _READ_AT_START
        ignored = [k for k in fixed if getattr(settings, k) != getattr(self.settings, k)]
        settings = settings.model_copy(update={k: getattr(self.settings, k) for k in fixed})
        changes = self.fleet.apply(settings)
        self.settings = self._proxy.settings = settings
        self._proxy.cards.timeout = settings.connect_timeout
        self._listings.settings = settings
        running = self.connections.limits.max_connections
        self.connections.limits = self._connection_limits(settings, running)
        self._local_hosts.clear()  # allowed_hosts may have changed
        self.origins = Origins(settings.allowed_origins)
        changes += [f"{k} needs a restart: kept" for k in ignored]
        log.info("reloaded", extra={"fields": {"changes": "; ".join(changes) or "none"}})
        return changes

    def reload_settings(self) -> list[str]:
        """Read the settings again and apply them; `ConfigError` leaves the running ones."""
        if self._reload is None:
            raise ConfigError("the gateway was not started from settings it can read again")
        return self.reconfigure(self._reload())

    # -- every request --------------------------------------------------------------------------

    async def handle(self, request: Request, reply: Reply) -> None:
        """Every answer in the API's own dialect, and one record per request."""
        path = request.path
        exchange = Exchange(request.method, path, f"addr:{request.remote}", time.monotonic())
        if self.tracing is not None and path in STREAM_DEFAULTS:
            exchange.trace = self.tracing.begin(request.headers)
        try:
            try:
                self._check_host_header(request)
                origin = self.origins.decide(request.method, request.headers)
                if origin.refused:
                    raise ApiError(403, self._origin_refused(request))
                if origin.headers:
                    reply.cross_origin = list(origin.headers)
                if origin.preflight:
                    reply.send(204, b"", None)
                    return
                route = self._route(request.method, path)
                access = self.access
                if access is not None and access.keys_required and self.needs_key(path):
                    given = api_key_of(request.headers)
                    exchange.key = name = (await access.authenticate(given, request.target)).name
                    reply.extra_headers = access.headers(name)  # on whatever it is answered
                await route(request, reply, exchange)
            except ApiError as exc:
                exchange.error = exc.message
                headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
                exchange.status = exc.status  # a stream told of its wait already said 200
                await refuse(reply, path, exc.status, exc.message, code=exc.code, headers=headers)
            exchange.status = exchange.status or reply.status
        except BaseException as exc:
            # 499, as nginx logs it: the client closed the connection before the answer ended.
            gone = isinstance(exc, asyncio.CancelledError | ClientGone)
            exchange.status = exchange.status or (499 if gone else 500)
            raise
        finally:
            exchange.finished_at = time.monotonic()
            self._record(exchange)

    def needs_key(self, path: str) -> bool:
        """Whether the route needs an API key where keys are required: the models' routes
        and listings, not the gateway's own (their own rules) nor model management (the
        admin rule, or a key's `manage` right)."""
        return path in self._keyed or path.startswith(_MODEL_PREFIX)

    def _route(self, method: str, path: str) -> Route:
        if path.startswith(_MODEL_PREFIX):
            path = _MODEL_PATH
        elif path.startswith(BLOB_PREFIX):
            path = _BLOB_PATH
        by_method = self.routes.get(path)
        if by_method is None:
            raise ApiError(404, f"no route {method} {excerpt(path)}")
        route = by_method.get(method) or by_method.get("GET" if method == "HEAD" else method)
        if route is None:
            raise ApiError(405, f"method {excerpt(method)} not allowed on {excerpt(path)}")
        return route

    @staticmethod
    def _origin_refused(request: Request) -> str:
        origin = excerpt(request.headers.get("Origin") or "")
        return (
            f"origin {origin!r} is not allowed: add it to allowed_origins "
            "(as OLLAMA_ORIGINS admits it at Ollama)"
        )

    def _check_host_header(self, request: Request) -> None:
        """Ollama's guard against DNS rebinding, kept for the Ollama behind the gateway: while
        the gateway listens on loopback only, a request naming another host is refused (a web
        page whose name now points at 127.0.0.1 must not reach the models)."""
        if not self._check_host:
            return
        header = request.headers.get("Host") or ""
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
        self.dashboard.recent.observe(exchange)
        if self.tracing is not None:
            self.tracing.finish(exchange)
        if self.access is not None:
            self.access.record(exchange)
        if not self.settings.log_requests:
            return
        # Model routes are the traffic; scrapes and listings would drown them at info level.
        level = logging.INFO if exchange.model is not None else logging.DEBUG
        if access_log.isEnabledFor(level):
            access_log.log(level, "request", extra={"fields": exchange.log_fields()})


def _access(settings: GatewaySettings) -> Access | None:
    """Keys, limits and the ledger, when keys are required or the ledger is on."""
    if settings.auth == "off" and not settings.ledger_on:
        return None
    return Access(
        Store(settings.database),
        keys_required=settings.auth == "keys",
        ledger=settings.ledger_on,
        ledger_capacity=settings.ledger_buffer,
        state=settings.state,
    )
