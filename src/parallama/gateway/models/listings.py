"""`/api/tags`, `/api/ps` and `/v1/models`: what the fleet has, as one server would list it.

Each answers the union over the healthy backends, asked at once; a backend that fails to answer
is left out. OpenAI-dialect engines are listed from the probes' last look instead of asked: a
listing could wait behind a generation there (llama.cpp's Python server answers one request at
a time, listings included).
"""

from __future__ import annotations

import asyncio
from typing import Any

from parallama.config import GatewaySettings
from parallama.core.exchange import Exchange
from parallama.core.scheduler import Scheduler
from parallama.errors import ApiError, excerpt
from parallama.gateway.fleet.backends import Fleet
from parallama.gateway.http.server import Reply, Request, send_json
from parallama.protocol import ollama
from parallama.protocol.inspect import Dialect
from parallama.protocol.ollama import normalize_name


def union(
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


class Listings:
    def __init__(self, scheduler: Scheduler, fleet: Fleet, settings: GatewaySettings) -> None:
        self._scheduler = scheduler
        self._fleet = fleet
        self.settings = settings  # replaced on reload

    async def tags(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Installed models: the union over healthy backends, first answer wins per name."""
        answers = [*await self._ask_all("/api/tags"), self._served_rows(expires=False)]
        send_json(reply, {"models": union(answers, "models", "name")})

    async def ps(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Loaded models over all backends, latest expiry first as Ollama sorts them."""
        answers = [*await self._ask_all("/api/ps"), self._served_rows(expires=True)]
        rows = union(answers, "models", "name", latest="expires_at")
        rows.sort(key=lambda row: str(row.get("expires_at", "")), reverse=True)
        send_json(reply, {"models": rows})

    async def models(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """The models of the healthy backends, in OpenAI's list format."""
        answers = await self._ask_all("/v1/models", dialects=("ollama", "openai"))
        send_json(reply, {"object": "list", "data": union(answers, "data", "id")})

    async def model(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`GET /v1/models/{model}`: the one model, if a healthy backend lists it (or it is an
        alias of one that does); else a 404."""
        wanted = request.path.removeprefix("/v1/models/")
        answers = await self._ask_all("/v1/models", dialects=("ollama", "openai"))
        rows = {normalize_name(row["id"]): row for row in union(answers, "data", "id")}
        name = normalize_name(wanted)
        entry = self.settings.model_entry(name)
        row = rows.get(name) or rows.get(entry.target or "" if entry else "")
        if row is None:
            raise ApiError(404, f"model {excerpt(wanted)!r} not found")
        send_json(reply, {**row, "id": wanted})

    async def _ask_all(
        self, path: str, dialects: tuple[Dialect, ...] = ("ollama",)
    ) -> list[dict[str, Any]]:
        """GET `path` from every healthy backend of those dialects at once; a backend that fails
        is left out."""
        fleet, target = self._fleet, path.encode()
        asked = [
            b.name
            for b in self._scheduler.backends.values()
            if b.healthy and fleet.dialect(b.name) in dialects
        ]
        answers = await asyncio.gather(
            *(
                fleet.upstreams[base].get_json(target, self.settings.connect_timeout)
                for base in asked
            )
        )
        return [answer for answer in answers if isinstance(answer, dict)]

    def _served_rows(self, *, expires: bool) -> dict[str, Any]:
        """What the healthy OpenAI-dialect engines serve, as `/api/tags` (or `/api/ps`) rows,
        from the probes' last look."""
        names = {
            name
            for b in self._scheduler.backends.values()
            if b.healthy and self._fleet.dialect(b.name) == "openai"
            for name in b.inventory or ()
        }
        return {"models": [ollama.served_model(name, expires=expires) for name in sorted(names)]}
