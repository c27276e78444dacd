"""The model routes (`/api/chat`, `/v1/chat/completions`, ...): a request read, inspected and
queued in the scheduler, then forwarded to the backend it binds it to, its answer relayed.

Answers are relayed as they arrive, chunk by chunk, without being parsed; only the last few
kilobytes are kept, for the token counts at their end. What happens after an attempt fails is
`Lifecycle`'s decision (sans-I/O), as is every update of the request's record; this only does
the I/O. A client that goes away leaves the
queue (its task is cancelled) or, mid-answer, closes the upstream request so the backend's slot
frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from parallama.config import GatewaySettings
from parallama.core.exchange import Exchange
from parallama.core.lifecycle import Failure, Lifecycle, refuse_input
from parallama.core.prefixes import prefix_blocks
from parallama.core.scheduler import Scheduler
from parallama.errors import ApiError, excerpt
from parallama.gateway.fleet.backends import Fleet
from parallama.gateway.http.http1 import Headers
from parallama.gateway.http.server import ClientGone, Reply, Request
from parallama.gateway.http.upstream import Connection, UpstreamError, UpstreamTimeout
from parallama.gateway.models.show import ModelCards
from parallama.gateway.relay import (
    PassThrough,
    Relay,
    ToChat,
    Translating,
    content_type_of,
    passable,
)
from parallama.gateway.waiting import Waiting
from parallama.protocol import anthropic, ollama, openai, responses
from parallama.protocol.bodies import parse_json_object
from parallama.protocol.inspect import (
    PINNABLE_PATHS,
    RequestInfo,
    dialect_of,
    error_body,
    inspect_request,
    with_model,
    with_pins,
)
from parallama.protocol.ollama import normalize_name
from parallama.protocol.translate import BadAnswer, error_message, ollama_request
from parallama.protocol.usage import (
    TAIL_BYTES,
    Usage,
    estimated_usage,
    keep_tail,
    usage_from_tail,
)
from parallama.teams.access import Access
from parallama.teams.keys import ApiKey
from parallama.teams.limits import RateLimited

log = logging.getLogger("parallama.gateway")
_NDJSON = ollama.NDJSON.encode()
_EVENT_STREAM = openai.EVENT_STREAM.encode()
_JSON = b"application/json"
_UPDATE_SECONDS = 1.0  # between a waiting stream's position comments
_QUEUE_WAIT = b"x-queue-wait-ms"  # the answer's time in the gateway's queue, over all its waits
# A client's credentials for the gateway, never sent on to a backend.
_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key"})
# Routes an engine may lack, done by its /v1/chat/completions then.
_AGENT_ROUTES = frozenset({anthropic.MESSAGES, responses.RESPONSES})
# What the OpenAI and Anthropic SDKs retry: a refusal that another try may pass (a full
# queue, a limit, no backend for now), never bad input (their `x-should-retry` header); nor a
# limit that lasts longer than they wait (a spent budget: the Anthropic SDK would try again
# after its own backoff, soon, and be refused again).
_RETRIED = frozenset({408, 409, 429, 502, 503, 504})
_LONGEST_RETRY = 60  # seconds: the longest Retry-After both SDKs wait for


def stream_error(path: str, content_type: bytes, status: int, message: str) -> bytes | None:
    """How a stream that already began says it failed, in its API's own way: Ollama's
    `{"error": ...}` line (which its clients raise), Anthropic's `event: error`, the Responses
    API's `response.failed`, or an SSE event with the OpenAI error object."""
    if content_type.startswith(_NDJSON):
        return ollama.error_body(message) + b"\n"
    if not content_type.startswith(_EVENT_STREAM):
        return None
    if path == anthropic.MESSAGES:
        return anthropic.error_event(status, message)
    if path == responses.RESPONSES:
        return responses.failed_event(message)
    return b"data: " + openai.error_body(status, message) + b"\n\n"


async def refuse(
    reply: Reply,
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """An error in the route's own format: the whole answer; or, for a stream whose head went
    out while it waited, its one event. On the OpenAI and Anthropic routes, whether the SDKs
    should try again."""
    dialect, headers = dialect_of(path), [*headers]
    if dialect != "ollama":
        headers = [
            *headers,
            (b"x-should-retry", b"true" if _retried(status, headers) else b"false"),
        ]
    if reply.started:
        event = stream_error(path, _EVENT_STREAM, status, message)
        assert event is not None
        await reply.write(event)
        reply.end()
        return
    reply.send(status, error_body(dialect, status, message, code), _JSON, headers)


def _retried(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    wait = next((v for k, v in headers if k.lower() == b"retry-after"), b"0")
    return status in _RETRIED and (not wait.isdigit() or int(wait) <= _LONGEST_RETRY)


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
        settings: GatewaySettings,
        access: Access | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.fleet = fleet
        self.settings = settings  # replaced on reload
        self._waiting = waiting
        self._access = access  # keys and their limits, when keys are required
        self.cards = ModelCards(scheduler, fleet, settings.connect_timeout)

    async def __call__(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """A model route: the request read and inspected, queued for a slot, forwarded to a
        backend that has the model, and its answer relayed (translated where the engine speaks
        another API)."""
        path = request.path
        try:  # bad input (too big, too slow, malformed) is counted as rejected
            body = request.body
            if body is None:  # still coming, or refused
                body = await request.read()
            info = inspect_request(path, body, request.headers, request.remote)
        except ApiError:
            refuse_input(self.scheduler, exchange)
            raise
        body, model = self._as_served(path, body, info, exchange)
        exchange.stream = info.stream
        scheduler, waiting = self.scheduler, self._waiting
        key = exchange.key
        client, weight = info.client, 1.0
        forwarded = passable(request.raw_headers)
        if key is not None:
            admitted = await self._admit(key, model, reply, exchange)
            client, weight = f"key:{key}", float(admitted.priority)
            forwarded = [(k, v) for k, v in forwarded if k.lower() not in _CREDENTIALS]
            if admitted.models:  # held to some models: exactly the model checked, no other
                body = with_model(body, model)
        life = Lifecycle(scheduler, exchange, self.settings.retries, waiting.changed)
        policy = scheduler.policy(model)
        # On every answer (refusals too), its last header; a list of its own: it is updated.
        reply.extra_headers = [*reply.extra_headers, (_QUEUE_WAIT, b"0")]
        try:
            life.admit(
                model,
                info.model,
                client=client,
                priority=info.priority,
                weight=weight,
                # Hashed only for the policy that uses it: hashing costs.
                session=info.session if policy == "session-affinity" else "",
                prefix=prefix_blocks(model, info.material) if policy == "prefix-affinity" else (),
                deadline=info.deadline,
                size=len(body),
            )
            outbound = _Outbound(path, request.target, forwarded, body, info)
            attempt = self._attempt if exchange.trace is None else self._traced_attempt
            while True:
                if life.waiting:
                    if info.queue_updates:
                        await self._wait_telling(reply, life, path)
                    else:
                        await waiting.until_bound(life.ticket)
                    waited = life.ticket.queue_seconds(time.monotonic())
                    reply.extra_headers[-1] = (_QUEUE_WAIT, b"%d" % round(waited * 1000))
                try:
                    await attempt(reply, outbound, life)
                    return
                except _Failover as failed:
                    given_up = life.failed(failed.failure)
                    if given_up is not None:
                        await refuse(reply, path, given_up.status, given_up.message)
                        return
        finally:
            life.close(time.monotonic())
            if key is not None and self._access is not None:
                self._access.finish(key, exchange)

    async def count_tokens(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`POST /v1/messages/count_tokens`: asked of a backend that has the model and counts
        (llama.cpp's server does; Ollama does not), without waiting for a slot: counting
        runs no generation. A 404 in Anthropic's format where none counts."""
        unqueued = self._unqueued(request, reply, exchange, anthropic.MESSAGES)
        async with unqueued as (body, model, _):
            forwarded = passable(request.raw_headers)
            if exchange.key is not None:
                forwarded = [(k, v) for k, v in forwarded if k.lower() not in _CREDENTIALS]
            status, whole, headers = await self._counted(request.target, forwarded, body, model)
        reply.send(status, whole, _JSON, headers)

    async def show(self, request: Request, reply: Reply, exchange: Exchange) -> None:
        """`POST /api/show`, without waiting for a slot (`show.ModelCards`)."""
        async with self._unqueued(request, reply, exchange, "/api/show") as (body, model, info):
            shown = await self.cards.answer(model, body)
        if shown is None:  # as Ollama says it: the name the client gave
            raise ApiError(404, ollama.model_not_found(excerpt(info.model.strip())))
        reply.send(*shown)

    @contextlib.asynccontextmanager
    async def _unqueued(
        self, request: Request, reply: Reply, exchange: Exchange, path: str
    ) -> AsyncIterator[tuple[bytes, str, RequestInfo]]:
        """A request that runs no generation, and so takes no slot: its body and model as the
        backends are to get them, and what it asked, read as `path`'s; a key's say on the
        model and its limits apply, as to a generation."""
        body = request.body if request.body is not None else await request.read()
        info = inspect_request(path, body, request.headers, request.remote)
        body, model = self._as_served(path, body, info, exchange)
        exchange.model = model
        key = exchange.key
        if key is not None:
            await self._admit(key, model, reply, exchange)
        try:
            yield body, model, info
        finally:
            if key is not None and self._access is not None:
                self._access.finish(key, exchange)

    async def _counted(
        self, target: bytes, headers: Headers, body: bytes, model: str
    ) -> tuple[int, bytes, Headers]:
        counting = [
            b
            for b in self.scheduler.backends.values()
            if b.serves(model) and self.fleet.serves(b.name, anthropic.COUNT_TOKENS)
        ]
        if not counting:
            raise ApiError(
                404,
                f"no backend serving model {excerpt(model)!r} counts tokens: Ollama has no "
                f"{anthropic.COUNT_TOKENS}; llama.cpp's llama-server has",
            )
        backend = min(counting, key=lambda b: b.load()).name
        relay = PassThrough(target, body, json_body=True)
        try:
            sent = relay.request_headers(headers)
            answer = await self.fleet.upstream(backend).send(b"POST", target, sent, body)
            try:
                whole = await answer.read()
            finally:
                answer.release()
        except UpstreamError as exc:
            raise ApiError(502, f"backend {backend} {exc}") from None
        if answer.status != 200:
            whole = anthropic.error_body(answer.status, error_message(whole))
        return answer.status, whole, relay.headers(answer.status, answer.headers)

    def _as_served(
        self, path: str, body: bytes, info: RequestInfo, exchange: Exchange
    ) -> tuple[bytes, str]:
        """The body and model as the backends are to get them: with the model's pinned
        `keep_alive` and options (`[models."name"]`), under the backends' name for it."""
        model = normalize_name(info.model)
        served = self.settings.model_entry(model)
        if served is not None and served.pinned and path in PINNABLE_PATHS:
            try:
                body = with_pins(
                    body,
                    model,
                    keep_alive=served.keep_alive,
                    options=served.options,
                    strict=served.strict,
                )
            except ApiError:
                refuse_input(self.scheduler, exchange)
                raise
        target = None if served is None else served.target
        if target is not None:
            body, model = with_model(body, target), target
        return body, model

    async def _wait_telling(self, reply: Reply, life: Lifecycle, path: str) -> None:
        """Wait for a backend, telling the client it is still in the queue once a second: the
        stream's head goes out now, then SSE comments (`: queued, position 3`), or on the
        Anthropic route its own `ping` events, which clients skip, until the answer's first
        event. An agent's stream (told without asking) says nothing of a wait shorter than a
        second: bound or refused by then, it is answered as any request, its status one the
        SDKs retry on."""
        ticket = life.ticket
        if path in _AGENT_ROUTES and not reply.started:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_UPDATE_SECONDS):
                    await self._waiting.until_bound(ticket)
            if not life.waiting:
                return
        if not reply.started:
            reply.start(200, [(b"cache-control", b"no-cache")], _EVENT_STREAM)
        while life.waiting:
            if path == anthropic.MESSAGES:
                await reply.write(anthropic.PING)
            else:
                position = self.scheduler.position(ticket)
                await reply.write(b": queued, position %d\n\n" % position)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_UPDATE_SECONDS):
                    await self._waiting.until_bound(ticket)

    async def _admit(self, key: str, model: str, reply: Reply, exchange: Exchange) -> ApiKey:
        """The key's say: may it use the model, is it within its limits (else 403, 429)."""
        assert self._access is not None  # a request has a key only when keys are required
        exchange.model = model
        try:
            admitted, reply.extra_headers = await self._access.admit(key, model, exchange)
            return admitted
        except ApiError as refused:
            refuse_input(self.scheduler, exchange)
            if isinstance(refused, RateLimited):
                reply.extra_headers = refused.rate_headers
            raise

    async def _attempt(
        self, reply: Reply, outbound: _Outbound, life: Lifecycle, traceparent: bytes | None = None
    ) -> None:
        """One backend's try at the request; `_Failover` if it failed before a byte reached
        the client (then `life` decides whether another backend may try). `traceparent`: the
        attempt's trace context, for the backend."""
        base = life.attempt()
        relay = self._relay(outbound, life)
        if relay.local is not None:  # nothing for the engine to do
            life.ended(200)
            reply.send(200, relay.local, _NDJSON if outbound.info.stream else _JSON)
            return
        answer: Connection | None = None
        headers: Headers = []
        relayed = _Relayed()
        try:
            sent = relay.request_headers(outbound.headers)
            if traceparent is not None:  # the trace goes on at the backend, under this attempt
                sent = [(k, v) for k, v in sent if k.lower() != b"traceparent"]
                sent.append((b"traceparent", traceparent))
            answer = await self.fleet.upstream(base).send(b"POST", relay.target, sent, relay.body)
            upstream_status = answer.status
            status = relay.status(upstream_status)
            if (elsewhere := life.answered(status)) is not None:
                raise _Failover(elsewhere)
            headers = relay.headers(upstream_status, answer.headers)
            if not outbound.info.stream or upstream_status != 200:  # one answer: whole
                whole = relay.whole(upstream_status, await answer.read())
                relayed.tail = whole[-TAIL_BYTES:]
                await _whole(reply, outbound.path, status, whole, headers)
            else:
                await _stream(answer, relay, reply, life, relayed, status=status, headers=headers)
        except (ClientGone, asyncio.CancelledError):  # the client left (its handler cancelled)
            life.exchange.usage = relayed.usage(outbound.body, cut=True)  # used till it left
            life.left()
            raise
        except (UpstreamError, BadAnswer) as exc:
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            reason = f"backend {base} {exc}"
            log.warning("backend failed", extra={"fields": {"backend": base, "error": reason}})
            if not relayed.began:
                # It answered, however badly (BadAnswer), or may have been working on it.
                worked_on = not isinstance(exc, UpstreamError) or exc.reached
                raise _Failover(Failure(status, reason, worked_on=worked_on)) from None
            life.exchange.usage = relayed.usage(outbound.body, cut=True)
            life.broke(reason)
            last_words = stream_error(outbound.path, content_type_of(headers), status, reason)
            if last_words is not None:
                await reply.write(last_words)
                reply.end()
            # else: a body cut in the middle; an answer left unended is cut by the server,
            # and only closing the connection says so
            return
        finally:
            if answer is not None:
                answer.release()  # back to the pool, or closed if the answer did not end
        life.ended(status, relayed.usage(outbound.body) if status == 200 else None)

    async def _traced_attempt(self, reply: Reply, outbound: _Outbound, life: Lifecycle) -> None:
        """`_attempt`, as a span of the request's trace: its backend, outcome and status."""
        trace = life.exchange.trace
        assert trace is not None
        attempt = trace.attempt(life.attempt(), time.monotonic())
        try:
            await self._attempt(reply, outbound, life, trace.traceparent(attempt))
            attempt.outcome = "answered" if reply.status < 500 else "failed"
        except _Failover:
            attempt.outcome = "failed over"
            raise
        except BaseException:
            attempt.outcome = "client left"
            raise
        finally:
            attempt.ended = time.monotonic()
            attempt.status = life.exchange.status

    def _relay(self, outbound: _Outbound, life: Lifecycle) -> Relay:
        """Bytes through, unless the engine lacks the route: an Ollama request at an
        OpenAI-dialect engine, an Anthropic Messages or Responses request at an engine not
        found to serve it."""
        engine = self.fleet.dialect(life.backend)
        path = outbound.path
        if path in _AGENT_ROUTES and not self.fleet.serves(life.backend, path):
            try:
                return ToChat(path, parse_json_object(outbound.body))
            except ApiError:  # a request the engine's chat completions cannot express
                life.rejected()
                raise
        if outbound.info.dialect != "ollama" or engine == "ollama":
            return PassThrough(outbound.target, outbound.body, json_body=engine == "openai")
        exchange = life.exchange
        arrived = time.time() - (time.monotonic() - exchange.started)
        try:
            translated = ollama_request(outbound.path, outbound.body, time.time())
        except ApiError:  # a request this engine's dialect cannot express
            life.rejected()
            raise
        return Translating(translated, arrived)


@dataclass(slots=True)
class _Relayed:
    """What of an answer reached the client: its last few kilobytes (the engine's counts are
    at the end) and, for a stream, the pieces relayed (NDJSON lines, or SSE `data:` lines)."""

    tail: bytes = b""
    head: bytes = b""  # an event stream's first bytes: Anthropic's say the prompt's tokens
    began: bool = False  # the answer's first bytes went to the client
    lines: int = 0
    event_stream: bool = False

    def usage(self, body: bytes, *, cut: bool = False) -> Usage | None:
        """The engine's counts, else (a stream that gave none) the gateway's estimate. A
        stream `cut` before its end counts no fewer pieces than were relayed: the counts it
        carried so far are its beginning's (Anthropic's `message_start` says 0 generated)."""
        said = usage_from_tail(self.head + self.tail if self.event_stream else self.tail)
        if not self.lines or (said is not None and not cut):
            return said
        estimate = estimated_usage(len(body), self.lines)
        if said is None:
            return estimate
        return Usage(
            prompt_tokens=said.prompt_tokens or estimate.prompt_tokens,
            generated_tokens=max(said.generated_tokens or 0, estimate.generated_tokens or 0),
            estimated=True,
        )


async def _whole(
    reply: Reply, path: str, status: int, whole: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    """A whole answer; or, to a stream told of its wait (its head went out), its one event: a
    stream answers whole only with an error."""
    if not reply.started:
        reply.send(status, whole, None, headers)
        return
    event = stream_error(path, _EVENT_STREAM, status, error_message(whole))
    await reply.write(event or b"data: " + whole.strip() + b"\n\n")
    reply.end()


async def _stream(
    answer: Connection,
    relay: Relay,
    reply: Reply,
    life: Lifecycle,
    relayed: _Relayed,
    *,
    status: int,
    headers: Headers,
) -> None:
    """Relay the answer chunk by chunk as it comes, noting in `relayed` what went.

    The chunks go to the client from the backend socket's own callback (`Connection.pump`),
    not through this task: a task switch per chunk was most of what a stream cost. The status
    line goes out with the first bytes for the client, not before: until then a backend that
    fails can still be replaced by another (a translated stream may begin with chunks that carry
    nothing for the client)."""
    relayed.event_stream = content_type_of(headers).startswith(_EVENT_STREAM)

    def to_client(data: bytes) -> bool:
        if chunk := relay.chunk(data):
            if not relayed.began:
                relayed.began = True
                life.first_byte(time.monotonic())
                if not reply.started:  # else it went out while the request waited
                    reply.start(status, headers)
            if relayed.event_stream and len(relayed.head) < TAIL_BYTES:
                relayed.head += chunk[: TAIL_BYTES - len(relayed.head)]
            relayed.tail = keep_tail(relayed.tail, chunk)
            relayed.lines += chunk.count(b"data: " if relayed.event_stream else b"\n")
            reply.write_now(chunk)
        return not reply.behind

    await answer.pump(to_client, reply.drain)
    if not reply.started:
        reply.start(status, headers)
    if last := relay.end():
        relayed.tail = keep_tail(relayed.tail, last)
        await reply.write(last)
    reply.end()
