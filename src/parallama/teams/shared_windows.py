"""Each key's request and token windows and its concurrency, counted in Redis by every gateway
that names it (`state = "redis://..."`), not by each gateway alone.

The rules are those of `limits.Limits` (sliding minutes kept as logs, the longest wait answers,
tokens counted when an answer ends), in Lua scripts that Redis runs atomically on its own clock:
a key with `rpm = 60` gets 60 requests a minute from all the gateways together. A request's place
in the key's concurrency is a lease renewed while it runs, so a gateway that dies gives it back
within a ttl. The ends of requests are written in batches by a task of their own, off the
request path. While Redis cannot be reached, each gateway counts alone (`Limits`), as without
Redis; the budget is the ledger's, shared through the database, either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from parallama.errors import StateUnavailable
from parallama.resp import UNAVAILABLE, Arg, Redis, Script, owner_name
from parallama.teams.keys import ApiKey
from parallama.teams.limits import (
    WINDOW,
    Headers,
    RateLimited,
    concurrency_reached,
    rate_headers,
    requests_reached,
    tokens_reached,
)

log = logging.getLogger("parallama.teams")
_AWAY_SECONDS = 1.0

# KEYS: the key's admissions (scored by when), answers' tokens (members "lease:tokens", scored
# by when they ended) and running requests (scored by when their lease expires). ARGV: rpm, tpm,
# concurrent (-1: no such limit), the lease id, its ttl (ms). Returns 1 (admitted) or 0, the
# limit that refused and its wait (ms), then the requests and tokens in the window and when
# the newest of each leaves it (ms).
_ADMIT = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[6])
local requests, answers, running = KEYS[1], KEYS[2], KEYS[3]
redis.call('ZREMRANGEBYSCORE', requests, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', answers, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', running, '-inf', now)
local rpm, tpm, concurrent = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local logged = redis.call('ZRANGE', answers, 0, -1, 'WITHSCORES')
local tokens = 0
for j = 1, #logged, 2 do tokens = tokens + tonumber(string.match(logged[j], ':(%d+)$')) end
local wait, limit = -1, ''
if concurrent >= 0 and redis.call('ZCARD', running) >= concurrent then
  wait, limit = 1000, 'concurrent'
end
local admitted = redis.call('ZCARD', requests)
if rpm >= 0 and admitted >= rpm then
  local oldest = redis.call('ZRANGE', requests, 0, 0, 'WITHSCORES')
  local w = tonumber(oldest[2]) + window - now
  if w > wait then wait, limit = w, 'requests' end
end
if tpm >= 0 and tokens >= tpm then
  local left, w = tokens, 0
  for j = 1, #logged, 2 do  -- when enough answers have left the window
    left = left - tonumber(string.match(logged[j], ':(%d+)$'))
    if left < tpm then w = tonumber(logged[j + 1]) + window - now break end
  end
  if w > wait then wait, limit = w, 'tokens' end
end
local ok = 0
if wait < 0 then
  ok, admitted = 1, admitted + 1
  redis.call('ZADD', requests, now, ARGV[4])
  redis.call('ZADD', running, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', requests, window * 2)
  redis.call('PEXPIRE', running, window * 2)
end
local newest = redis.call('ZRANGE', requests, -1, -1, 'WITHSCORES')
local requests_reset = newest[2] and tonumber(newest[2]) + window - now or 0
local tokens_reset = #logged > 0 and tonumber(logged[#logged]) + window - now or 0
return {ok, limit, math.floor(wait), admitted, requests_reset, tokens, tokens_reset}
"""
# KEYS: (running, answers) of each request that ended; ARGV: (lease id, tokens, whether tpm is
# limited: 1 or 0) of each.
_FINISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS / 2 do
  local lease, tokens = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1])
  redis.call('ZREM', KEYS[2 * i - 1], lease)
  if tokens > 0 and ARGV[3 * i] == '1' then
    redis.call('ZADD', KEYS[2 * i], now, lease .. ':' .. tokens)
    redis.call('PEXPIRE', KEYS[2 * i], 120000)
  end
end
"""
# KEYS: running sets, one per lease; ARGV: ttl (ms), then the lease ids.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[1 + i])
end
"""


def _keys(name: str) -> list[str]:
    base = f"parallama:key:{name}"
    return [f"{base}:requests", f"{base}:answers", f"{base}:running"]


class SharedWindows:
    def __init__(self, url: str, ttl: float = 5.0) -> None:
        self._redis = Redis(url, timeout=2.0)
        self._ttl_ms = int(ttl * 1000)
        self._admit, self._finish, self._renew = Script(_ADMIT), Script(_FINISH), Script(_RENEW)
        self._prefix = owner_name(self) + ":"
        self._ids = itertools.count()
        self._running: dict[str, str] = {}  # lease -> key name, renewed while the request runs
        self._ended: list[tuple[str, str, int, bool]] = []  # (key, lease, tokens, tpm limited)
        self._written: asyncio.Future[None] | None = None  # done once `_ended` is written
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._away_until = 0.0  # after a failure, Redis is asked again only from then on
        self.last_headers: dict[str, Headers] = {}  # per key, as the last admission saw it

    async def start(self) -> None:
        """Give Redis the scripts now: a script first run later, and found missing, would be
        run again after commands sent behind it (an end counted after the next admission)."""
        with contextlib.suppress(*UNAVAILABLE):  # else each gateway counts alone for now
            await self._redis.execute([s.load() for s in (self._admit, self._finish, self._renew)])
        self._tasks = [
            asyncio.create_task(self._write_ends(), name="parallama-key-ends"),
            asyncio.create_task(self._renew_forever(), name="parallama-key-leases"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*UNAVAILABLE):
            await self._write(self._ended)
        await self._redis.close()

    @property
    def up(self) -> bool:
        """False for a while after Redis failed to answer: each gateway counts alone then."""
        return asyncio.get_running_loop().time() >= self._away_until

    async def admit(self, key: ApiKey) -> tuple[str, Headers]:
        """Count a request of `key` in, across gateways: its lease and the headers for its
        answer. Raises `RateLimited`, or `StateUnavailable` (the caller counts alone)."""
        if self._written is not None:  # ends this gateway saw first count first
            await asyncio.shield(self._written)
        lease = f"{self._prefix}{next(self._ids)}"
        limits = [-1 if n is None else n for n in (key.rpm, key.tpm, key.max_concurrent)]
        try:
            answer = await self._redis.run(
                self._admit, _keys(key.name), [*limits, lease, self._ttl_ms, int(WINDOW * 1000)]
            )
        except UNAVAILABLE as exc:
            if self.up:
                log.warning(
                    "shared state: Redis unreachable; each gateway counts the keys' limits alone",
                    extra={"fields": {"error": str(exc) or type(exc).__name__}},
                )
            self._away_until = asyncio.get_running_loop().time() + _AWAY_SECONDS
            raise StateUnavailable(str(exc)) from exc
        ok, limit, wait, requests, requests_reset, tokens, tokens_reset = answer
        headers = rate_headers(key, requests, requests_reset / 1000, tokens, tokens_reset / 1000)
        self.last_headers[key.name] = headers
        if not ok:
            reasons = {
                b"concurrent": concurrency_reached(key.max_concurrent or 0)[1:],
                b"requests": requests_reached(key.rpm or 0),
                b"tokens": tokens_reached(key.tpm or 0),
            }
            name, message = reasons[limit]
            raise RateLimited(name, message, wait / 1000, headers)
        self._running[lease] = key.name
        return lease, headers

    def finish(self, key: ApiKey, lease: str, tokens: int) -> None:
        """The request is over: its lease given back and its tokens counted, soon (in a batch)."""
        self._running.pop(lease, None)
        self._ended.append((key.name, lease, tokens, key.tpm is not None))
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        self._wake.set()

    async def _write_ends(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ended, self._ended = self._ended, []
            written, self._written = self._written, None
            try:
                # Unwritten, the leases lapse; the tokens are lost to the window, not the ledger.
                with contextlib.suppress(*UNAVAILABLE):
                    await self._write(ended)
            finally:
                if written is not None and not written.done():
                    written.set_result(None)

    async def _write(self, ended: list[tuple[str, str, int, bool]]) -> None:
        if not ended:
            return
        keys: list[Arg] = []
        args: list[Arg] = []
        for name, lease, tokens, tpm in ended:
            _, answers, running = _keys(name)
            keys += [running, answers]
            args += [lease, tokens, int(tpm)]
        await self._redis.run(self._finish, keys, args)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            running = list(self._running.items())
            if not running:
                continue
            keys: list[Arg] = [_keys(name)[2] for _, name in running]
            leases = [lease for lease, _ in running]
            with contextlib.suppress(*UNAVAILABLE):
                await self._redis.run(self._renew, keys, [self._ttl_ms, *leases])
