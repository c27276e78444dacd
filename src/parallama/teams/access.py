"""What the gateway asks of teams on each request: who is this key, may it use this model, is
it within its limits; and, at the end, what it used (the limits and the ledger are told).

Nothing here waits on the database. Keys are held in memory, reloaded by a task of its own when
the database's key revision moves (it is polled twice a second, so a revoked key stops working
within a second, and a request with a key this gateway does not know yet waits for the next
poll: a key made on another gateway works at once); the budgets' usage is read again every few
seconds (other gateways may share the database). While the database cannot be reached, the keys
known last keep working, and the ledger keeps its rows in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from parallama.core.exchange import Exchange
from parallama.errors import ApiError, ParallamaError, StateUnavailable
from parallama.redaction import KEY_SHAPE
from parallama.teams.keys import (
    PERIODS,
    ApiKey,
    key_id_of,
    make_key,
    matches,
    period_start,
)
from parallama.teams.ledger import Ledger
from parallama.teams.limits import Headers, Limits, RateLimited
from parallama.teams.store import Store, UsageRow
from parallama.teams.worker import DatabaseThread

if TYPE_CHECKING:
    from parallama.teams.shared_windows import SharedWindows

log = logging.getLogger("parallama.teams")
T = TypeVar("T")

_KEY_POLL_SECONDS = 0.5
_NEW_KEY_WAIT = 3 * _KEY_POLL_SECONDS  # for the next poll, of a key not known (yet)
_BUDGET_POLL_SECONDS = 5.0
_POLL_TIMEOUT = 2.0  # a database slower than this to answer a poll counts as down
_STOP_SECONDS = 3.0  # for writing out the ledger at stop
# Query parameters that would carry a key in the URL, where proxies and logs keep it.
_KEY_PARAMETERS = frozenset({"key", "api_key", "api-key", "apikey", "token", "access_token"})


class Access:
    def __init__(
        self,
        store: Store,
        *,
        keys_required: bool,
        ledger: bool,
        ledger_capacity: int,
        state: str = "memory",
    ) -> None:
        """`state`: where the keys' windows and concurrency are counted; a Redis URL shares
        them with every gateway that names it."""
        self.store = store
        self.keys_required = keys_required
        self._thread = DatabaseThread()
        self.limits = Limits()
        self.windows: SharedWindows | None = None
        if state != "memory":  # the Redis client (and hiredis) imported only for it
            from parallama.teams.shared_windows import SharedWindows

            self.windows = SharedWindows(state)
        self.ledger = Ledger(self._in_thread_write, capacity=ledger_capacity) if ledger else None
        self._by_id: dict[str, ApiKey] = {}
        self._by_name: dict[str, ApiKey] = {}
        self._revision = -1
        self._next_poll = asyncio.Event()  # set when the next poll to start has ended
        self._budgets_read = 0.0
        self._task: asyncio.Task[None] | None = None
        self.database_up = True
        # Per key, for /metrics: requests by outcome, tokens by kind, refusals by limit.
        self.requests: Counter[tuple[str, str]] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.limited: Counter[tuple[str, str]] = Counter()

    # -- life -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate the schema and load the keys: a database that cannot be reached now stops
        the start (`StoreError`), as no key could be checked."""
        await self._in_thread(self.store.migrate)
        await self._refresh(force_budgets=True)
        if self.ledger is not None:
            self.ledger.start()
        self._task = asyncio.create_task(self._poll(), name="parallama-keys")
        if self.windows is not None:
            await self.windows.start()

    async def stop(self) -> None:
        """Write out the ledger and close the database, within bounds: a database that stopped
        answering must not keep the gateway from stopping."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.windows is not None:
            await self.windows.stop()
        if self.ledger is not None:
            await self.ledger.stop(timeout=_STOP_SECONDS)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_POLL_TIMEOUT):
                await self._in_thread(self.store.close)
        self._thread.stop()

    # -- every request --------------------------------------------------------------------------

    async def authenticate(self, given: str | None, target: bytes) -> ApiKey:
        """The request's key (`inspect.api_key_of`: a Bearer token or `x-api-key`), or a 401.

        A key of our shape whose id is not known waits for the next poll of the keys (a
        bounded wait, costing the database nothing more): it may have been made a moment ago
        on another gateway sharing the database."""
        if b"?" in target and _key_in_url(target):
            raise _unauthorized("API keys go in the Authorization header, never in the URL")
        if not given:
            raise _unauthorized(
                "an API key is required: send Authorization: Bearer <key> (or x-api-key: <key>)"
            )
        key_id = key_id_of(given)
        if key_id is not None and key_id not in self._by_id and self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_NEW_KEY_WAIT):
                    await self._next_poll.wait()
        key = None if key_id is None else self._by_id.get(key_id)
        if key is None or not matches(given, key):
            raise _unauthorized("invalid API key")
        if key.revoked_at is not None:
            raise _unauthorized(f"API key {key.name!r} was revoked")
        if not key.usable(time.time()):
            raise _unauthorized(f"API key {key.name!r} has expired")
        return key

    def headers(self, name: str) -> Headers:
        """The key's rate-limit headers as they stand: for answers that count nothing."""
        key = self._by_name.get(name)
        if key is None:
            return []
        if self.windows is not None and name in self.windows.last_headers:
            return self.windows.last_headers[name]
        return self.limits.headers(key, time.monotonic())

    async def admit(self, name: str, model: str, exchange: Exchange) -> tuple[ApiKey, Headers]:
        """A model request by the key `name`: 403 if the key may not use the model, 429
        (`RateLimited`, with the headers of its answer) if a limit is reached; else counted
        in: the key, and the rate-limit headers for its answer."""
        key = self._by_name.get(name)
        if key is None:  # removed between authentication and now
            raise _unauthorized("invalid API key")
        if not key.may_use(model):
            raise ApiError(
                403, f"API key {name!r} may not use model {model!r}", code="model_not_allowed"
            )
        windows = self.windows
        shared = windows is not None and windows.up
        try:
            headers = self.limits.admit(key, time.monotonic(), time.time(), windows=not shared)
            if windows is not None and shared:
                try:
                    exchange.key_lease, headers = await windows.admit(key)
                except RateLimited:
                    self.limits.finish(key, 0, time.monotonic(), time.time(), windows=False)
                    raise
                except StateUnavailable:  # counted here alone, as without Redis
                    self.limits.finish(key, 0, time.monotonic(), time.time(), windows=False)
                    headers = self.limits.admit(key, time.monotonic(), time.time())
            return key, headers
        except RateLimited as limited:
            self.limited[name, limited.limit] += 1
            raise

    def finish(self, name: str, exchange: Exchange) -> None:
        """An admitted request is over: what it used counts against its limits."""
        key = self._by_name.get(name)
        if key is None:
            return
        tokens, lease = _tokens(exchange), exchange.key_lease
        if self.windows is not None and lease is not None:
            self.windows.finish(key, lease, tokens)
        self.limits.finish(key, tokens, time.monotonic(), time.time(), windows=lease is None)

    def key_names(self) -> list[str]:
        return sorted(self._by_name)

    def record(self, exchange: Exchange) -> None:
        """A request ended: its counters, and its row in the ledger if it was for a model."""
        name = exchange.key
        if name is not None and exchange.model is not None:
            self.requests[name, exchange.outcome or "rejected"] += 1
            usage = exchange.usage
            if usage is not None:
                self.tokens[name, "prompt"] += usage.prompt_tokens or 0
                self.tokens[name, "generated"] += usage.generated_tokens or 0
        if self.ledger is not None and exchange.model is not None:
            self.ledger.add(_row(exchange))

    # -- the admin API --------------------------------------------------------------------------

    async def create_key(self, name: str, limits: Mapping[str, Any]) -> tuple[str, ApiKey]:
        key, record = make_key(name, limits, time.time())
        await self._in_thread(functools.partial(self.store.add_key, record))
        await self._refresh()  # usable at once on this gateway
        return key, record

    async def revoke_key(self, name: str) -> ApiKey:
        revoke = functools.partial(self.store.update_key, name, revoked_at=time.time())
        record = await self._in_thread(revoke)
        await self._refresh()
        return record

    async def list_keys(self) -> list[ApiKey]:
        return await self._in_thread(self.store.keys)

    async def usage(self, since: float, by: Sequence[str]) -> list[dict[str, Any]]:
        return await self._in_thread(functools.partial(self.store.usage, since, by))

    # -- the database, off the request path ---------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_KEY_POLL_SECONDS)
            # The requests waiting now are told when this poll ends: it reads the keys after
            # they came (a poll under way when they came may have read them before).
            finished, self._next_poll = self._next_poll, asyncio.Event()
            try:
                async with asyncio.timeout(_POLL_TIMEOUT):  # silent counts as down
                    await self._refresh()
            except (ParallamaError, TimeoutError) as exc:
                if self.database_up:
                    log.warning(
                        "database unreachable: serving the keys known so far",
                        extra={"fields": {"error": str(exc) or "no answer in time"}},
                    )
                self.database_up = False
            else:
                if not self.database_up:
                    log.info("database reachable again")
                self.database_up = True
            finally:
                finished.set()  # whatever it found

    async def _refresh(self, *, force_budgets: bool = False) -> None:
        revision = await self._in_thread(self.store.revision)
        if revision != self._revision:
            keys = await self._in_thread(self.store.keys)
            gone = set(self._by_name) - {k.name for k in keys}
            self._by_name = {k.name: k for k in keys}
            self._by_id = {k.key_id: k for k in keys}
            self.limits.forget(gone)
            self._revision = revision
        now = time.monotonic()
        if self.ledger is not None and (
            force_budgets or now - self._budgets_read > _BUDGET_POLL_SECONDS
        ):
            await self._read_budgets()
            self._budgets_read = now

    async def _read_budgets(self) -> None:
        """Each budgeted key's tokens in its period: the ledger's, with the rows not yet in it."""
        assert self.ledger is not None
        wall = time.time()
        for period in PERIODS:
            names = [
                k.name
                for k in self._by_name.values()
                if k.budget is not None and k.budget.period == period
            ]
            if not names:
                continue
            since = period_start(period, wall)
            stored = await self._in_thread(functools.partial(self.store.tokens_since, since))
            pending = self.ledger.pending_tokens()
            for name in names:
                self.limits.set_budget_used(name, stored.get(name, 0) + pending.get(name, 0), since)

    async def _in_thread(self, call: Callable[[], T]) -> T:
        return await self._thread.run(call)

    async def _in_thread_write(self, rows: Sequence[UsageRow]) -> None:
        await self._in_thread(functools.partial(self.store.write_usage, rows))

    def usage_by_key(self) -> list[dict[str, Any]]:
        """Per key since the gateway started: requests, tokens, refusals (the dashboard)."""
        totals: dict[str, Counter[str]] = {name: Counter() for name in self.key_names()}
        for kind, counts in (
            ("requests", self.requests),
            ("tokens", self.tokens),
            ("rate_limited", self.limited),
        ):
            for (name, _), n in counts.items():  # one pass each, however many keys
                totals.setdefault(name, Counter())[kind] += n
        return [
            {
                "name": name,
                **{kind: total[kind] for kind in ("requests", "tokens", "rate_limited")},
                "in_flight": self.limits.in_flight(name),
            }
            for name, total in sorted(totals.items())
        ]

    # -- /metrics -------------------------------------------------------------------------------

    def collector(self) -> Collector:
        return _AccessCollector(self)


class _AccessCollector(Collector):
    def __init__(self, access: Access) -> None:
        self._access = access

    def collect(self) -> Iterator[Metric]:
        a = self._access
        families: list[tuple[str, str, list[str], Counter[tuple[str, str]]]] = [
            ("parallama_key_requests", "Model requests per API key, by outcome",
             ["key", "outcome"], a.requests),
            ("parallama_key_tokens", "Tokens per API key, prompt or generated",
             ["key", "kind"], a.tokens),
            ("parallama_key_rate_limited", "Requests answered 429, per API key and limit",
             ["key", "limit"], a.limited),
        ]  # fmt: skip
        for name, documentation, labels, counts in families:
            family = CounterMetricFamily(name, documentation, labels=labels)
            for pair, value in sorted(counts.items()):
                family.add_metric(list(pair), value)
            yield family
        in_flight = GaugeMetricFamily(
            "parallama_key_in_flight",
            "Admitted requests not yet ended, per API key",
            labels=["key"],
        )
        for name in a.key_names():
            in_flight.add_metric([name], a.limits.in_flight(name))
        yield in_flight
        yield GaugeMetricFamily(
            "parallama_database_up",
            "1 if the keys' database answered the gateway's last poll",
            value=1 if a.database_up else 0,
        )
        ledger = a.ledger
        if ledger is None:
            return
        yield GaugeMetricFamily(
            "parallama_ledger_up", "1 if the usage ledger's last write succeeded",
            value=1 if ledger.up else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "parallama_ledger_buffered_rows",
            "Usage rows waiting to be written (kept while the database is unreachable)",
            value=ledger.buffered,
        )
        yield CounterMetricFamily(
            "parallama_ledger_written_rows", "Usage rows written", value=ledger.written
        )
        yield CounterMetricFamily(
            "parallama_ledger_failed_writes",
            "Tries to write the ledger that found the database unreachable (with backoff)",
            value=ledger.failed_writes,
        )
        yield CounterMetricFamily(
            "parallama_ledger_dropped_rows",
            "Usage rows lost: the buffer was full while the database was unreachable",
            value=ledger.dropped,
        )


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")


def _key_in_url(target: bytes) -> bool:
    """A parameter named as keys are, or anything shaped like one of ours, in the query."""
    query = urllib.parse.unquote(target.partition(b"?")[2].decode("latin-1"))
    if KEY_SHAPE.search(query):
        return True
    names = (part.partition("=")[0].strip().lower() for part in query.split("&"))
    return any(name in _KEY_PARAMETERS for name in names)


def _tokens(exchange: Exchange) -> int:
    usage = exchange.usage
    if usage is None:
        return 0
    return (usage.prompt_tokens or 0) + (usage.generated_tokens or 0)


def _row(exchange: Exchange) -> UsageRow:
    usage = exchange.usage
    seconds = exchange.seconds
    return UsageRow(
        id=uuid.uuid4().hex,
        at=time.time() - (seconds or 0.0),
        key_name=exchange.key,
        model=exchange.model,
        backend=exchange.backend,
        status=exchange.status,
        outcome=exchange.outcome,
        prompt_tokens=None if usage is None else usage.prompt_tokens,
        generated_tokens=None if usage is None else usage.generated_tokens,
        queue_seconds=exchange.queue_seconds,
        seconds=seconds,
    )


def describe(key: ApiKey) -> dict[str, Any]:
    """A key as the CLI and the admin API show it: everything but its hash."""
    return {
        "name": key.name,
        "id": key.key_id,
        "models": list(key.models),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "max_concurrent": key.max_concurrent,
        "budget": None if key.budget is None else str(key.budget),
        "priority": key.priority,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "manage": key.manage,
    }
