"""The usage ledger's writer: rows of finished requests, written in batches by a task of its own.

A request only appends its row to a buffer; the task writes what has gathered every second (or
sooner once a batch is full), through the store's thread. When the database cannot be reached
the rows stay in the buffer, bounded by `capacity`, and the writer tries again with backoff:
nothing is lost for an outage shorter than the buffer holds; past that the oldest rows go, and
are counted. On a clean stop the buffer is written out. A SIGKILL loses what the buffer held:
at most the last second's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from parallama.teams.store import StoreError, StoreUnavailable, UsageRow

log = logging.getLogger("parallama.ledger")

Write = Callable[[Sequence[UsageRow]], Awaitable[None]]


class Ledger:
    def __init__(
        self,
        write: Write,
        *,
        capacity: int = 100_000,
        batch: int = 1000,
        interval: float = 1.0,
        max_backoff: float = 10.0,
        write_timeout: float = 15.0,
    ) -> None:
        self._write = write
        self.capacity = capacity
        self._batch = batch
        self._interval = interval
        self._max_backoff = max_backoff
        self._write_timeout = write_timeout  # a database that stopped answering is down
        self._rows: deque[UsageRow] = deque()
        self._in_transit: Sequence[UsageRow] = ()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.up = True  # the last write succeeded
        self.written = 0
        self.dropped = 0
        self.failed_writes = 0  # tries that found the database unreachable

    @property
    def buffered(self) -> int:
        return len(self._rows) + len(self._in_transit)

    def add(self, row: UsageRow) -> None:
        rows = self._rows
        if len(rows) >= self.capacity:
            rows.popleft()
            self.dropped += 1
        rows.append(row)
        if len(rows) >= self._batch:
            self._full.set()

    def pending_tokens(self) -> dict[str, int]:
        """Tokens per key in rows not yet in the database."""
        tokens: dict[str, int] = {}
        for rows in (self._rows, self._in_transit):
            for row in rows:
                if row.key_name is not None:
                    used = (row.prompt_tokens or 0) + (row.generated_tokens or 0)
                    tokens[row.key_name] = tokens.get(row.key_name, 0) + used
        return tokens

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="parallama-ledger")

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop the task, then write what is left (within `timeout`)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(timeout):
                while self._rows and await self._flush():
                    pass
        except TimeoutError:
            pass
        if self._rows:
            log.error(
                "usage ledger: rows not written at stop",
                extra={"fields": {"rows": len(self._rows)}},
            )

    async def _run(self) -> None:
        backoff = self._interval
        while True:
            if self.up:  # a full batch goes at once, else what a second gathered
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._full.wait()
            else:  # down: every request must not be a try; wait out the backoff
                await asyncio.sleep(backoff)
            self._full.clear()
            while self._rows:
                if not await self._flush():
                    backoff = min(self._max_backoff, backoff * 2)
                    break
                backoff = self._interval
                if len(self._rows) < self._batch:
                    break

    async def _flush(self) -> bool:
        """Write one batch; False if the database cannot be reached (the rows go back in
        front). A batch the database refuses for what it holds is written row by row, and a
        row it still refuses is dropped and counted, so that one bad row cannot stop the rest."""
        rows = self._rows
        batch = [rows.popleft() for _ in range(min(self._batch, len(rows)))]
        self._in_transit = batch
        try:
            async with asyncio.timeout(self._write_timeout):
                written = await self._write_refusing_bad_rows(batch)
        except BaseException as exc:
            # Back in front, in order; written twice is harmless (rows have ids), and a write
            # cancelled by `stop` may still have committed.
            rows.extendleft(reversed(batch))
            while len(rows) > self.capacity:
                rows.popleft()
                self.dropped += 1
            if not isinstance(exc, StoreUnavailable | TimeoutError):
                raise
            self.failed_writes += 1
            if self.up:
                log.warning(
                    "usage ledger: cannot write; rows kept in memory until the database is back",
                    extra={"fields": {"error": str(exc) or "no answer", "buffered": len(rows)}},
                )
            self.up = False
            return False
        finally:
            self._in_transit = ()
        if not self.up:
            log.info("usage ledger: writing again", extra={"fields": {"buffered": len(rows)}})
        self.up = True
        self.written += written
        self.dropped += len(batch) - written
        return True

    async def _write_refusing_bad_rows(self, batch: Sequence[UsageRow]) -> int:
        try:
            await self._write(batch)
            return len(batch)
        except StoreUnavailable:
            raise
        except StoreError:
            pass
        written = 0
        for row in batch:
            try:
                await self._write((row,))
                written += 1
            except StoreUnavailable:
                raise
            except StoreError as exc:
                log.error(
                    "usage ledger: a row the database refuses is dropped",
                    extra={"fields": {"error": str(exc), "model": str(row.model)[:64]}},
                )
        return written
