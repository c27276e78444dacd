"""The gateway's own routes: `/`, `/api/version`, `/metrics`, `/parallama/status` and the admin
routes (the admin token, or a loopback client when none is set): `POST /parallama/reload`, and
for scripts what `parallama keys` and `parallama usage` do: `GET`/`POST /parallama/keys`,
`POST /parallama/keys/revoke`, `GET /parallama/usage?since=7d&by=key,model`."""

from __future__ import annotations

import hmac
import ipaddress
import time
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from parallama import __version__
from parallama.core.exchange import Exchange
from parallama.errors import ApiError, ConfigError
from parallama.gateway.http.server import Reply, Request, send_json
from parallama.gateway.observability.metrics import CONTENT_TYPE
from parallama.gateway.observability.status import backend_state
from parallama.protocol import ollama
from parallama.protocol.hosts import host_of, local_host
from parallama.protocol.inspect import api_key_of
from parallama.teams.access import Access, describe
from parallama.teams.keys import LIMITS, parse_age
from parallama.teams.store import GROUPS, KeyExists, UnknownKey

T = TypeVar("T")

if TYPE_CHECKING:
    from parallama.gateway.app import Gateway

_ROOT = ollama.ROOT_TEXT.encode()
_TEXT = b"text/plain; charset=utf-8"
_VERSION = __version__.encode()


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Admin:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def root(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Ollama's own answer, "Ollama is running": clients probe it before anything else."""
        reply.send(200, _ROOT, _TEXT)

    async def version(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """The Ollama version clients may count on (Codex refuses an Ollama before 0.13.4, Open
        WebUI reads it as numbers): the lowest among the healthy Ollama backends, but not below
        the first release with every route the gateway serves whatever the engine (it does the
        work of `/v1/messages` and `/v1/responses` where an engine lacks them); a current one
        where there is no Ollama. parallama's own is in a header, and in `/parallama/status`."""
        lowest = self._gateway.fleet.ollama_version()
        if lowest is None:
            version = ollama.CURRENT_VERSION
        else:
            version = ".".join(map(str, max(lowest, *ollama.ROUTE_SINCE.values())))
        reply.extra_headers = [*reply.extra_headers, (b"x-parallama-version", _VERSION)]
        send_json(reply, {"version": version})

    async def live(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Liveness: 200 while the process answers at all (a Kubernetes liveness probe restarts
        it otherwise). Says nothing of the backends: a fleet that is down is no reason to
        restart the gateway."""
        send_json(reply, {"status": "live"})

    async def ready(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Readiness: 200 when the gateway can take traffic, else 503 with the reasons (no
        addresses in them: anyone may ask)."""
        reasons = self._gateway.readiness()
        if reasons:
            send_json(reply, {"ready": False, "reasons": reasons}, 503)
        else:
            send_json(reply, {"ready": True})

    async def prometheus(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Every metric in Prometheus' text format."""
        reply.send(200, self._gateway.metrics.render(), CONTENT_TYPE.encode())

    async def status(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """The seed's `get_stats` (total, completed, rejected, timeout, queue_size, active),
        every outcome, and each backend's state. It names the backends' addresses (and, under
        `parallama up`, the engines' process ids and log files): a client on the network gets
        it under the admin rule; one on this machine, as it always did."""
        if not _is_loopback(request.remote):
            self.authorize(request)
        gateway = self._gateway
        s = gateway.scheduler
        counts = s.accounting()
        backends = [backend_state(b) for b in s.backends.values()]
        payload = {
            **counts,
            "timeout": counts["timed_out"],
            "queue_size": counts["queued"],
            "active": counts["in_flight"],
            "queues": s.queue_depths(),
            "routing": gateway.settings.routing,
            "version": __version__,
            "backends": backends,
            **{name: section() for name, section in gateway.status_sections.items()},
        }
        send_json(reply, payload)

    async def reload(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`POST /parallama/reload`: what SIGHUP does, with the outcome in the answer."""
        self.authorize(request)
        try:
            changes = self._gateway.reload_settings()
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        send_json(reply, {"reloaded": True, "changes": changes})

    async def keys(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`GET /parallama/keys`: every key (never a hash); `POST`: a new key, shown once."""
        access = self._access(request)
        if request.method != "POST":
            send_json(reply, [describe(k) for k in await access.list_keys()])
            return
        given = await _json_object(request)
        name = given.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "name: the new key's name is required")
        unknown = set(given) - {"name", *LIMITS}
        if unknown:
            raise ApiError(400, f"unknown fields: {', '.join(sorted(unknown))[:200]}")
        key, record = await _refusing_bad_input(access.create_key(name, given))
        send_json(reply, {"key": key, **describe(record)}, status=201)

    async def revoke_key(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`POST /parallama/keys/revoke` with `{"name": ...}`."""
        access = self._access(request)
        name = (await _json_object(request)).get("name")
        if not isinstance(name, str):
            raise ApiError(400, "name: the key to revoke is required")
        send_json(reply, describe(await _refusing_bad_input(access.revoke_key(name))))

    async def usage(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`GET /parallama/usage?since=7d&by=key,model`: the ledger summed."""
        access = self._access(request)
        query = urllib.parse.parse_qs(request.target.partition(b"?")[2].decode("latin-1"))
        by = [g for g in query.get("by", ["key,model"])[0].split(",") if g]
        if not set(by) <= set(GROUPS):
            raise ApiError(400, f"by: some of {','.join(GROUPS)}")
        try:
            since = time.time() - parse_age(query.get("since", ["7d"])[0])
        except ConfigError as exc:
            raise ApiError(400, f"since: {exc}") from None
        send_json(reply, await access.usage(since, by))

    def _access(self, request: Request) -> Access:
        self.authorize(request)
        access = self._gateway.access
        if access is None:
            raise ApiError(404, 'no keys or ledger here: set auth = "keys" (or ledger = "on")')
        return access

    async def authorize_management(self, request: Request, exchange: Exchange) -> None:
        """Model management (pull, push, create, copy, delete, blobs): the admin rule, or
        where keys are required an API key given the `manage` right (a team's Open WebUI
        pulling a model with its own key)."""
        try:
            self.authorize(request)
            return
        except ApiError:
            access = self._gateway.access
            given = api_key_of(request.headers)
            if access is None or not access.keys_required or not given:
                raise
        key = await access.authenticate(given, request.target)
        if not key.manage:
            raise ApiError(403, f"API key {key.name!r} may not manage models: give it --manage yes")
        exchange.key = key.name

    def authorize(self, request: Request) -> None:
        """The admin token, or (none set) a loopback client naming a local host. Never a web
        page, whatever the client: a browser on this machine is a loopback client, and any page
        it shows could post to these routes (a browser says where a request comes from in
        `Origin`)."""
        origin = request.headers.get("Origin")
        if origin is not None and not _loopback_origin(origin):
            raise ApiError(403, "admin routes do not answer requests from web pages")
        token = self._gateway.settings.admin_token
        if token is None:
            host = request.headers.get("Host") or ""
            if not _is_loopback(request.remote) or not local_host(host):
                raise ApiError(
                    403, "admin routes: loopback clients only, unless admin_token is set"
                )
            return
        given = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "admin routes need Authorization: Bearer <admin_token>")


def _loopback_origin(origin: str) -> bool:
    """A page served from this machine's loopback (`http://localhost:3000`), not from the
    network, and not an opaque origin (`null`: a file, a sandboxed frame)."""
    host = host_of(urllib.parse.urlsplit(origin).netloc)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return _is_loopback(host)


async def _json_object(request: Request) -> dict[str, Any]:
    """The body, which must say it is JSON: a form or `text/plain` (what a web page may post
    to any address without asking) is refused."""
    content_type = request.headers.get("Content-Type") or ""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as Content-Type: application/json")
    try:
        given = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(given, dict):
        raise ApiError(400, "the body must be a JSON object")
    return given


async def _refusing_bad_input(operation: Awaitable[T]) -> T:
    """Bad limits, a taken name, an unknown key: 400 or 404 with the reason."""
    try:
        return await operation
    except UnknownKey as exc:
        raise ApiError(404, str(exc)) from None
    except (ConfigError, KeyExists) as exc:
        raise ApiError(400 if isinstance(exc, ConfigError) else 409, str(exc)) from None
