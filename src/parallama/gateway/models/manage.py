"""Model management across the fleet: `/api/pull`, `/api/push`, `/api/create`, `/api/copy` and
`/api/delete` go to every Ollama backend at once (or to those named in `X-Parallama-Backends`,
comma-separated), and only for an admin (the admin token, or a loopback client): they change
what the fleet has.

A streamed answer (pull, push and create stream their progress, as Ollama's do) is one NDJSON
stream: each backend's lines as they come, with `"backend"` added, then a last line with the
outcome per backend (`"status": "success"` when every backend succeeded, else `"error"` and
the reason). A whole answer says the same in one object, with status 200 when every backend
succeeded, else 502. The backends are probed again afterwards: what they have installed
changed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson

from parallama.core.exchange import Exchange
from parallama.errors import ApiError, excerpt
from parallama.gateway.http.server import Reply, Request, send_json
from parallama.gateway.http.upstream import UpstreamError
from parallama.protocol import ollama
from parallama.protocol.bodies import parse_json_object

if TYPE_CHECKING:
    from parallama.gateway.app import Gateway
    from parallama.gateway.fleet.backends import Fleet

ROUTES = {
    "/api/pull": "POST",
    "/api/push": "POST",
    "/api/create": "POST",
    "/api/copy": "POST",
    "/api/delete": "DELETE",
}
_STREAMED = {"/api/pull", "/api/push", "/api/create"}
_JSON = [(b"Content-Type", b"application/json")]
_NDJSON = ollama.NDJSON.encode()
_MAX_LINE = 64 * 1024  # a progress line longer than this is cut: nothing legitimate is


class FleetModels:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def __call__(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """Model management on every Ollama backend (or the ones named), progress merged: under
        the admin rule, or with a key given the `manage` right."""
        await self._gateway.admin.authorize_management(request, exchange)
        body = await request.read()
        data = parse_json_object(body)
        path = request.path
        targets = ollama_targets(self._gateway.fleet, request.headers.get("X-Parallama-Backends"))
        if not targets:
            raise ApiError(503, "no Ollama backend to send it to")
        streamed = path in _STREAMED and data.get("stream", True) is not False
        try:
            if streamed:
                await self._streamed(path, body, targets, reply)
            else:
                outcomes = await asyncio.gather(*(self._whole(url, path, body) for url in targets))
                results = dict(zip(targets, outcomes, strict=True))
                ok = all(r == "success" for r in results.values())
                send_json(reply, _summary(results), status=200 if ok else 502)
        finally:
            for url in targets:
                self._gateway.fleet.probe_now(url)

    async def _whole(self, url: str, path: str, body: bytes) -> str:
        """One backend's outcome: "success", or the reason it failed."""
        method = ROUTES[path].encode()
        try:
            answer = await self._gateway.fleet.upstream(url).send(
                method, path.encode(), _JSON, body
            )
            try:
                text = await answer.read()
            finally:
                answer.release()
        except UpstreamError as exc:
            return f"backend {exc}"
        if answer.status == 200:
            return "success"
        return reason(text, answer.status)

    async def _streamed(self, path: str, body: bytes, targets: list[str], reply: Reply) -> None:
        lines: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        results: dict[str, str] = {}

        async def follow(url: str) -> None:
            try:
                results[url] = await self._follow(url, path, body, lines)
            except UpstreamError as exc:
                results[url] = f"backend {exc}"
            finally:
                await lines.put(b"")  # this backend is done

        reply.start(200, [], _NDJSON)
        running = [asyncio.ensure_future(follow(url)) for url in targets]
        try:
            done = 0
            while done < len(running):  # each backend's reads time out on their own
                line = await lines.get()
                if line:
                    await reply.write(line)
                else:
                    done += 1
            await reply.write(orjson.dumps(_summary(results)) + b"\n")
            reply.end()
        finally:
            for task in running:
                task.cancel()

    async def _follow(self, url: str, path: str, body: bytes, lines: asyncio.Queue[bytes]) -> str:
        """Relay one backend's progress lines, tagged with it; its outcome."""
        method, upstream = ROUTES[path].encode(), self._gateway.fleet.upstream(url)
        answer = await upstream.send(method, path.encode(), _JSON, body)
        outcome, buffered = "", b""
        try:
            while (chunk := await answer.next_chunk()) is not None:
                buffered += chunk
                *whole, buffered = buffered.split(b"\n")
                buffered = buffered[-_MAX_LINE:]
                for line in whole:
                    tagged, said = _tagged(line, url)
                    if tagged is not None:
                        await lines.put(tagged)
                        outcome = said or outcome
        finally:
            answer.release()
        if answer.status != 200:
            return outcome or reason(buffered, answer.status)
        return outcome or "no status"


def ollama_targets(fleet: Fleet, named: str | None) -> list[str]:
    """The Ollama backends, or those named in `X-Parallama-Backends` (each must be one)."""
    ollama_backends = [url for url in fleet.upstreams if fleet.dialect(url) == "ollama"]
    if not named:
        return ollama_backends
    wanted = [url.strip().rstrip("/") for url in named.split(",") if url.strip()]
    unknown = [url for url in wanted if url not in ollama_backends]
    if unknown:
        raise ApiError(400, f"not an Ollama backend of this gateway: {excerpt(unknown[0])}")
    return wanted


def _tagged(line: bytes, url: str) -> tuple[bytes | None, str]:
    """A backend's progress line with its name added, and what it says of the outcome."""
    try:
        said = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, ""
    if not isinstance(said, dict):
        return None, ""
    said["backend"] = url
    if isinstance(said.get("error"), str):
        return orjson.dumps(said) + b"\n", excerpt(said["error"], 200)
    return orjson.dumps(said) + b"\n", "success" if said.get("status") == "success" else ""


def reason(text: bytes, status: int) -> str:
    """What a backend's answer says went wrong: its error, or its status."""
    try:
        said: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        said = None
    if isinstance(said, dict) and isinstance(said.get("error"), str):
        return excerpt(said["error"], 200)
    return f"answered {status}"


def _summary(results: dict[str, str]) -> dict[str, Any]:
    failed = {url: why for url, why in results.items() if why != "success"}
    summary: dict[str, Any] = {"status": "error" if failed else "success", "backends": results}
    if failed:
        url, why = next(iter(failed.items()))
        summary["error"] = f"{len(failed)} of {len(results)} backends failed: {url}: {why}"
    return summary
