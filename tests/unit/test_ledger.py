"""The ledger's writer, against a database stand-in that is reachable or not as the test says
(the writer takes its write function as an argument: the real one is exercised against SQLite
and PostgreSQL in the integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from parallama.teams.ledger import Ledger
from parallama.teams.store import StoreError, StoreUnavailable, UsageRow


def row(n: int, model: str = "m") -> UsageRow:
    return UsageRow(str(n), float(n), "k", model, "b", 200, "completed", 1, 1, 0.0, 0.1)


class Database:
    def __init__(self) -> None:
        self.reachable = True
        self.rows: dict[str, UsageRow] = {}
        self.tries = 0

    async def write(self, rows: Sequence[UsageRow]) -> None:
        self.tries += 1
        await asyncio.sleep(0)
        if not self.reachable:
            raise StoreUnavailable("database: connection refused")
        if any(r.model == "bad" for r in rows):
            raise StoreError("database: DataError: invalid byte sequence")
        self.rows.update((r.id, r) for r in rows)


async def test_an_outage_costs_a_few_tries_not_one_per_request() -> None:
    database = Database()
    ledger = Ledger(database.write, batch=10, interval=0.01, max_backoff=0.5)
    ledger.start()
    database.reachable = False
    for n in range(300):  # thirty batches' worth while it is down
        ledger.add(row(n))
        await asyncio.sleep(0.001)
    assert database.tries < 30  # backoff, not a try per full batch
    assert not ledger.up and ledger.buffered == 300
    database.reachable = True
    await ledger.stop()
    assert len(database.rows) == 300 and ledger.dropped == 0


async def test_a_row_the_database_refuses_is_dropped_alone() -> None:
    database = Database()
    ledger = Ledger(database.write, batch=10, interval=0.01)
    ledger.start()
    for n in range(25):
        ledger.add(row(n, "bad" if n == 12 else "m"))
    await ledger.stop()
    assert sorted(database.rows) == sorted(str(n) for n in range(25) if n != 12)
    assert ledger.dropped == 1 and ledger.up


async def test_past_its_capacity_the_oldest_rows_go_and_are_counted() -> None:
    database = Database()
    database.reachable = False
    ledger = Ledger(database.write, capacity=100, batch=10, interval=0.01, max_backoff=0.02)
    ledger.start()
    for n in range(130):
        ledger.add(row(n))
    await asyncio.sleep(0.05)
    database.reachable = True
    await ledger.stop()
    assert ledger.dropped == 30
    assert sorted(database.rows, key=int) == [str(n) for n in range(30, 130)]
