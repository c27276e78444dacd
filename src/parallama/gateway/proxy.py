"""The model routes (`/api/chat`, `/v1/chat/completions`, ...): a request read, inspected and
queued in the scheduler, then forwarded to the backend it binds it to, its answer relayed.

Answers are relayed as they arrive, chunk by chunk, without being parsed; only the last few
kilobytes are kept, for the token counts at their end. What happens after an attempt fails is
`Forwarding`'s decision (sans-I/O); this only does the I/O. A client that goes away leaves the
queue (its task is cancelled) or, mid-answer, closes the upstream request so the backend's slot
frees.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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
from parallama.errors import ApiError
from parallama.gateway.exchange import Exchange
from parallama.gateway.fleet import Fleet
from parallama.gateway.metrics import GatewayMetrics
from parallama.gateway.relay import PassThrough, Relay, Translating, content_type_of, passable
from parallama.gateway.server import ClientGone, Reply, Request
from parallama.gateway.upstream import Connection, Headers, UpstreamError, UpstreamTimeout
from parallama.gateway.waiting import Waiting
from parallama.protocol import ollama, openai
from parallama.protocol.inspect import RequestInfo, error_body, inspect_request, with_model
from parallama.protocol.ollama import normalize_name
from parallama.protocol.translate import BadAnswer, ollama_request
from parallama.protocol.usage import TAIL_BYTES, keep_tail, usage_from_tail

log = logging.getLogger("parallama.gateway")
_NDJSON = ollama.NDJSON.encode()
_JSON = b"application/json"


def _error_chunk(content_type: bytes, message: str) -> bytes | None:
    """How a stream that already began says it failed: Ollama's `{"error": ...}` line (which
    its clients raise), or an SSE event with the OpenAI error object."""
    if content_type.startswith(_NDJSON):
        return ollama.error_body(message) + b"\n"
    if content_type.startswith(openai.EVENT_STREAM.encode()):
        return b"data: " + openai.error_body(502, message) + b"\n\n"
    return None


@dataclass(frozen=True, slots=True)
class _Outbound:
    """What is sent to whichever backend takes the request."""

    path: str
    target: bytes  # the path with its query, as the client sent it
    headers: Headers
    body: bytes
    info: RequestInfo


class _Failover(Exception):
    """The attempt failed before a byte reached the client: another backend may try."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class Proxy:
    def __init__(
        self,
        scheduler: Scheduler,
        fleet: Fleet,
        waiting: Waiting,
        metrics: GatewayMetrics,
        settings: GatewaySettings,
    ) -> None:
        self.scheduler = scheduler
        self.fleet = fleet
        self.metrics = metrics
        self.settings = settings  # replaced on reload
        self._waiting = waiting

    async def __call__(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        path = request.path
        body, info = await self._read(request, path, exchange)
        model = normalize_name(info.model)
        target = self.settings.aliases.get(model)
        if target is not None:
            body, model = with_model(body, target), target
        exchange.model, exchange.stream, exchange.client = model, info.stream, info.client
        ticket = self._submit(info, model, exchange)
        try:
            if ticket.backend is None:
                await self._bound(ticket)
            outbound = _Outbound(path, request.target, passable(request.raw_headers), body, info)
            await self._forward(reply, outbound, ticket, exchange)
        finally:
            if ticket.outcome is None:  # cancelled, or an error escaped
                self.scheduler.cancel(ticket)
                self._waiting.changed()
            assert ticket.outcome is not None
            exchange.outcome = ticket.outcome.value
            exchange.queue_seconds = ticket.queue_seconds(time.monotonic())

    async def _read(
        self, request: Request, path: str, exchange: Exchange
    ) -> tuple[bytes, RequestInfo]:
        """The body and what routing needs of it; bad input is counted as rejected."""
        try:
            body = request.body
            if body is None:  # still coming, or refused
                body = await request.read()
            info = inspect_request(path, body, request.headers, request.remote)
        except ApiError:
            self.scheduler.refuse()
            exchange.outcome = Outcome.REJECTED.value
            raise
        return body, info

    def _submit(self, info: RequestInfo, model: str, exchange: Exchange) -> Ticket:
        """Into the gateway's queue (or bound at once to a backend with a free slot)."""
        scheduler = self.scheduler
        try:
            affine = scheduler.policy(model) == "session-affinity"
            return scheduler.submit(
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

    async def _bound(self, ticket: Ticket) -> None:
        """Until the ticket has a backend; 503 if it waited longer than the queue allows."""
        await self._waiting.until_bound(ticket)
        if ticket.outcome is Outcome.TIMED_OUT:
            retry = str(int(self.scheduler.retry_after(ticket.model)))
            waited = self.settings.queue_timeout
            message = f"timed out after {waited:g} s waiting in the queue"
            raise ApiError(503, message, {"Retry-After": retry})

    async def _forward(
        self, reply: Reply, outbound: _Outbound, ticket: Ticket, exchange: Exchange
    ) -> None:
        """Try the bound backend; what happens next is `Forwarding`'s decision: before the
        first byte reached the client, a failed attempt may move to another backend, else the
        client gets a clear error."""
        retries = self.settings.retries
        forwarding = Forwarding(self.scheduler, ticket, retries, self._waiting.changed)
        while True:
            try:
                await self._attempt(reply, outbound, forwarding, exchange)
                return
            except _Failover as failed:
                exchange.error = failed.failure.reason
                left = forwarding.backend
                given_up = forwarding.failed(failed.failure)
                if given_up is not None:
                    exchange.status = status = given_up.status
                    reply.send(status, error_body(outbound.info.dialect, status, given_up.message))
                    return
                self.metrics.failover(left)
                await self._bound(ticket)

    async def _attempt(
        self, reply: Reply, outbound: _Outbound, forwarding: Forwarding, exchange: Exchange
    ) -> None:
        base = exchange.backend = forwarding.backend
        relay = self._relay(outbound, forwarding, exchange)
        if relay.local is not None:  # nothing for the engine to do
            forwarding.ended(200)
            reply.send(200, relay.local, _NDJSON if outbound.info.stream else _JSON)
            return
        answer: Connection | None = None
        headers: Headers = []
        tail = b""
        try:
            sent = relay.request_headers(outbound.headers)
            answer = await self.fleet.upstream(base).send(b"POST", relay.target, sent, relay.body)
            upstream_status = answer.status
            exchange.status = status = relay.status(upstream_status)
            if (elsewhere := forwarding.answered(status)) is not None:
                raise _Failover(elsewhere)
            headers = relay.headers(upstream_status, answer.headers)
            if not outbound.info.stream or upstream_status != 200:  # one answer: whole
                whole = relay.whole(upstream_status, await answer.read())
                tail = whole[-TAIL_BYTES:]
                reply.send(status, whole, None, headers)
            else:
                tail = await _stream(answer, relay, reply, exchange, status=status, headers=headers)
        except ClientGone:
            forwarding.left()
            exchange.status = 499
            raise
        except (UpstreamError, BadAnswer) as exc:
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            reason = f"backend {base} {exc}"
            log.warning("backend failed", extra={"fields": {"backend": base, "error": reason}})
            if not reply.started:
                # It answered, however badly (BadAnswer), or may have been working on it.
                worked_on = not isinstance(exc, UpstreamError) or exc.reached
                raise _Failover(Failure(status, reason, worked_on=worked_on)) from None
            exchange.error = reason
            forwarding.broke()
            last_words = _error_chunk(content_type_of(headers), reason)
            if last_words is not None:
                await reply.write(last_words)
                reply.end()
            # else: a body cut in the middle; an answer left unended is cut by the server,
            # and only closing the connection says so
            return
        finally:
            if answer is not None:
                answer.release()  # back to the pool, or closed if the answer did not end
        if status == 200:
            exchange.usage = usage_from_tail(tail)
        forwarding.ended(status)

    def _relay(self, outbound: _Outbound, forwarding: Forwarding, exchange: Exchange) -> Relay:
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


async def _stream(
    answer: Connection,
    relay: Relay,
    reply: Reply,
    exchange: Exchange,
    *,
    status: int,
    headers: Headers,
) -> bytes:
    """Relay the answer chunk by chunk as it comes; return its last few kilobytes.

    The status line goes out with the first bytes for the client, not before: until then a
    backend that fails can still be replaced by another (a translated stream may begin with
    chunks that carry nothing for the client)."""
    tail = b""
    while (data := await answer.next_chunk()) is not None:
        if chunk := relay.chunk(data):
            if not reply.started:
                exchange.first_byte_at = time.monotonic()
                reply.start(status, headers)
            tail = keep_tail(tail, chunk)
            await reply.write(chunk)
    if not reply.started:
        reply.start(status, headers)
    if last := relay.end():
        tail = keep_tail(tail, last)
        await reply.write(last)
    reply.end()
    return tail
