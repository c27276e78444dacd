"""A lean Redis client for the shared state: one connection, commands pipelined, replies parsed
by hiredis's C reader; and a subscription on a connection of its own.

redis-py's asyncio client took 135 us a round trip on loopback where the socket itself takes
55 (measured on this project's 2-core machine: a PING in a loop, both on uvloop). A gateway with
shared state makes a round trip or two per request, so that difference was most of what Redis
added. What the gateway needs is small: commands and scripts in pipelines, and a subscription.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from parallama.errors import ConfigError

Arg = str | bytes | int | float
Command = Sequence[Arg]
_MAX_MESSAGES = 4096  # a subscription's messages not yet read; later ones are dropped


def owner_name(owner: object) -> str:
    """A name for what writes to the shared state, unique across hosts and processes (host,
    process, object): the members of sets and hashes that say whose an entry is."""
    return f"{socket.gethostname()}:{os.getpid()}:{id(owner):x}"


class ReplyError(Exception):
    """Redis answered a command with an error."""


class NoScriptError(ReplyError):
    """EVALSHA of a script this Redis does not have (it restarted, or was flushed)."""


# What means Redis cannot be used now: no connection, no answer in time, or an error answer.
UNAVAILABLE = (OSError, TimeoutError, ReplyError)


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_url(url: str) -> Address:
    """`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"state: {url!r} is not a redis:// or rediss:// URL with a host")
    path = parts.path.strip("/")
    try:
        db, port = int(path or 0), parts.port or 6379
    except ValueError:
        raise ConfigError(f"state: {url!r}: the port and database must be numbers") from None
    return Address(
        parts.hostname,
        port,
        db,
        urllib.parse.unquote(parts.username) if parts.username else None,
        urllib.parse.unquote(parts.password) if parts.password else None,
        parts.scheme == "rediss",
    )


class Script:
    """A Lua script, run by its SHA1 (Redis keeps scripts it was given: `load` it again after
    a `NoScriptError`)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def call(self, keys: Sequence[Arg], args: Sequence[Arg]) -> list[Arg]:
        """The command that runs it."""
        return ["EVALSHA", self.sha, len(keys), *keys, *args]

    def load(self) -> list[Arg]:
        return ["SCRIPT", "LOAD", self.text]


class _Protocol(asyncio.Protocol):
    """Replies in order to the commands sent; then, subscribed, each message to `pushed`."""

    def __init__(self, pushed: Callable[[Any], None] | None = None) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._pushed = pushed
        self._transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():  # else its caller gave up waiting
                    waiter.set_result(reply)
            elif self._pushed is not None:
                self._pushed(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"Redis connection lost: {self.lost}"))
        if self._pushed is not None:
            self._pushed(self.lost)

    def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        assert self._transport is not None
        if self.lost is not None:
            raise ConnectionError(f"Redis connection lost: {self.lost}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        packed = (hiredis.pack_command(cast(Any, tuple(c))) for c in commands)  # stub too narrow
        self._transport.write(b"".join(packed))
        return futures

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _raise_errors(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            raise (NoScriptError if message.startswith("NOSCRIPT") else ReplyError)(message)
    return replies


async def _connect(address: Address, protocol: _Protocol) -> _Protocol:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if address.tls else None
    await loop.create_connection(lambda: protocol, address.host, address.port, ssl=context)
    hello: list[Command] = []
    if address.password is not None:
        auth = [address.username, address.password] if address.username else [address.password]
        hello.append(["AUTH", *auth])
    if address.db:
        hello.append(["SELECT", address.db])
    if hello:
        replies = [await f for f in protocol.send(hello)]
        _raise_errors(replies)
    return protocol


class Redis:
    """One connection, opened when first needed and again after it was lost; every command
    waits at most `timeout` seconds (a connection that timed out is closed: its replies could
    not be told apart from later ones')."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.address = parse_url(url)
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def execute(
        self, commands: Sequence[Command], scripts: Sequence[Script] = ()
    ) -> list[Any]:
        """The commands in one pipeline: their replies, or the first error answer raised. A
        Redis that lost the `scripts` they run (it restarted) is given them again, and the
        pipeline sent once more (what ran the first time is run twice)."""
        try:
            return await self._execute(commands)
        except NoScriptError:
            if not scripts:
                raise
            await self._execute([script.load() for script in scripts])
            return await self._execute(commands)

    async def _execute(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        try:
            async with asyncio.timeout(self._timeout):
                protocol = await self._connected()
                replies = [await future for future in protocol.send(commands)]
        except TimeoutError:
            self._drop()
            raise
        return _raise_errors(replies)

    async def call(self, *command: Arg) -> Any:
        return (await self.execute([command]))[0]

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """One script, given to Redis again if it lost it."""
        return (await self.execute([script.call(keys, args)], [script]))[0]

    async def close(self) -> None:
        self._drop()

    async def _connected(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is None or self._protocol.lost is not None:
                self._protocol = await _connect(self.address, _Protocol())
            return self._protocol

    def _drop(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def messages(self, *channels: str) -> AsyncIterator[tuple[bytes, bytes]]:
        """Subscribed to `channels` on a connection of its own: (channel, message) as they
        come, until the connection is lost (`ConnectionError`). Messages the reader does not
        keep up with (past a few thousand) are dropped."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def pushed(reply: Any) -> None:
            if queue.qsize() < _MAX_MESSAGES or isinstance(reply, BaseException):
                queue.put_nowait(reply)

        protocol = _Protocol(pushed)
        try:
            async with asyncio.timeout(self._timeout):
                await _connect(self.address, protocol)
                await protocol.send([["SUBSCRIBE", *channels]])[0]  # the first channel's yes
            while True:
                reply = await queue.get()
                if isinstance(reply, BaseException):
                    raise ConnectionError(f"Redis subscription lost: {reply}")
                if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                    yield reply[1], reply[2]
        finally:
            protocol.close()
