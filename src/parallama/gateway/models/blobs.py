"""Model blobs across the fleet: `HEAD` and `POST /api/blobs/:digest` on every Ollama backend
at once (or those named in `X-Parallama-Backends`), so that `/api/create` with `files` (the
`ollama` client's `create_blob` then `create(files=...)`, `ollama create` from a GGUF, Open
WebUI's upload) finds the blob wherever it runs.

A blob is gigabytes: it is streamed through, never held. The client's body is read piece by
piece and each piece goes to every backend's upload, at the pace of the slowest (a few pieces
wait per backend); a backend that has the blob already answers at once and is left out of the
rest. `HEAD` is 200 when every backend has the blob (else 404: `ollama create` then uploads
it); `POST` is 201 when every backend has it now (200 when each had it before), the backends'
own 400 when they all refuse it alike (a digest that is not the body's), else 502 naming the
first that failed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from parallama.core.exchange import Exchange
from parallama.errors import ApiError
from parallama.gateway.http.server import Reply, Request, send_json
from parallama.gateway.models.manage import ollama_targets, reason
from parallama.protocol import ollama

if TYPE_CHECKING:
    import aiohttp

    from parallama.gateway.app import Gateway

PREFIX = "/api/blobs/"
_WAITING_PIECES = 4  # per backend: what the fastest may be ahead of the slowest
_ANSWER_LIMIT = 64 * 1024  # an upload's answer is a status and at most an error


class FleetBlobs:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def __call__(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """A model file: asked of (`HEAD`) or streamed to (`POST`) every Ollama backend, under
        the admin rule or with a key given the `manage` right."""
        await self._gateway.admin.authorize_management(request, exchange)
        digest = request.path.removeprefix(PREFIX)
        if not ollama.BLOB_DIGEST.fullmatch(digest):
            raise ApiError(400, ollama.INVALID_DIGEST)
        targets = ollama_targets(self._gateway.fleet, request.headers.get("X-Parallama-Backends"))
        if not targets:
            raise ApiError(503, "no Ollama backend to send it to")
        import aiohttp  # here, not at start: rare work, and 10 MB in every gateway otherwise

        settings = self._gateway.settings
        timeout = aiohttp.ClientTimeout(
            sock_connect=settings.connect_timeout, sock_read=settings.request_timeout
        )
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            if request.method == "POST":
                outcomes = await _upload(session, request, digest, targets)
            else:
                outcomes = await asyncio.gather(
                    *(_ask(session, "HEAD", f"{url}{PREFIX}{digest}") for url in targets)
                )
        status, message = _verdict(request.method, dict(zip(targets, outcomes, strict=True)))
        if message is None:
            reply.send(status, b"", None)
        else:
            send_json(reply, {"error": message}, status)


async def _ask(
    session: aiohttp.ClientSession, method: str, url: str, body: object = None
) -> tuple[int, str]:
    """One backend's status and what it said (0 and why, if it could not be asked)."""
    import aiohttp

    try:
        async with session.request(method, url, data=body) as answer:
            text = await answer.content.read(_ANSWER_LIMIT)
            return answer.status, reason(text, answer.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, f"backend {type(exc).__name__}: {exc}"[:200]


async def _upload(
    session: aiohttp.ClientSession, request: Request, digest: str, targets: list[str]
) -> list[tuple[int, str]]:
    """The body to every backend at once, each piece once the slowest has room for it."""
    pipes = {url: asyncio.Queue[bytes | None](maxsize=_WAITING_PIECES) for url in targets}

    async def body(pipe: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (piece := await pipe.get()) is not None:
            yield piece

    tasks = {
        url: asyncio.ensure_future(_ask(session, "POST", f"{url}{PREFIX}{digest}", body(pipe)))
        for url, pipe in pipes.items()
    }
    for url, task in tasks.items():  # answered early (it has the blob): nothing more waits
        task.add_done_callback(functools.partial(_drain, pipes[url]))
    try:
        async for piece in request.pieces():
            for url, pipe in pipes.items():
                if not tasks[url].done():
                    await pipe.put(piece)
        for url, pipe in pipes.items():
            if not tasks[url].done():
                await pipe.put(None)
        return list(await asyncio.gather(*tasks.values()))
    finally:
        for task in tasks.values():
            task.cancel()  # the client went, or its body failed: the uploads stop


def _drain(pipe: asyncio.Queue[bytes | None], _: object) -> None:
    """Room for the piece being put, if one is: nothing reads this pipe any more."""
    while not pipe.empty():
        pipe.get_nowait()


def _verdict(method: str, outcomes: dict[str, tuple[int, str]]) -> tuple[int, str | None]:
    """The fleet's answer: status and error message (None: no body)."""
    statuses = [status for status, _ in outcomes.values()]
    if all(status in (200, 201) for status in statuses):
        created = method == "POST" and 201 in statuses
        return (201 if created else 200), None
    failed = {url: said for url, said in outcomes.items() if said[0] not in (200, 201)}
    first_url, (first_status, first_said) = next(iter(failed.items()))
    if method == "HEAD":
        return 404, None  # some backend lacks it: upload it (HEAD answers carry no body)
    alike = len(failed) == len(outcomes) and len({s for s, _ in failed.values()}) == 1
    if alike and 400 <= first_status < 500:
        return first_status, first_said
    return 502, f"{len(failed)} of {len(outcomes)} backends failed: {first_url}: {first_said}"
