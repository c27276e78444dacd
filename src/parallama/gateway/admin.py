"""The gateway's own routes: `/`, `/api/version`, `/metrics`, `/parallama/status` and the admin
route `POST /parallama/reload` (the admin token, or a loopback client when none is set)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING

from parallama import __version__
from parallama.core.exchange import Exchange
from parallama.errors import ApiError, ConfigError
from parallama.gateway.metrics import CONTENT_TYPE
from parallama.gateway.server import Reply, Request, send_json
from parallama.protocol import ollama

if TYPE_CHECKING:
    from parallama.gateway.app import Gateway

_ROOT = ollama.ROOT_TEXT.encode()
_TEXT = b"text/plain; charset=utf-8"


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Admin:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def root(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        reply.send(200, _ROOT, _TEXT)

    async def version(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        send_json(reply, {"version": __version__})

    async def prometheus(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        reply.send(200, self._gateway.metrics.render(), CONTENT_TYPE.encode())

    async def status(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """The seed's `get_stats` (total, completed, rejected, timeout, queue_size, active),
        every outcome, and each backend's state."""
        gateway = self._gateway
        s = gateway.scheduler
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
            "routing": gateway.settings.routing,
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

    def authorize(self, request: Request) -> None:
        token = self._gateway.settings.admin_token
        if token is None:
            if not _is_loopback(request.remote):
                raise ApiError(
                    403, "admin routes: loopback clients only, unless admin_token is set"
                )
            return
        given = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "admin routes need Authorization: Bearer <admin_token>")
