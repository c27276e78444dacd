"""Keys and the usage ledger in one database: SQLite (a file, the default) or PostgreSQL.

Blocking on purpose: the CLI calls it directly, and the gateway from one thread of its own, so
that no request ever waits on it. The SQL is the subset both databases speak; the few places
they differ (placeholders, the day of a timestamp, the migration lock) are a `_Dialect` each.
The schema is versioned: `open_store` applies the missing migrations, under a lock, so two
gateways starting together apply each once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from parallama.errors import ParallamaError
from parallama.teams.keys import ApiKey, Budget

GROUPS = ("key", "model", "day", "backend", "outcome")

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: keys, their revision counter, the ledger
        """CREATE TABLE keys (
            name TEXT PRIMARY KEY,
            key_id TEXT NOT NULL UNIQUE,
            key_hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            models TEXT NOT NULL,
            rpm BIGINT,
            tpm BIGINT,
            max_concurrent BIGINT,
            budget_tokens BIGINT,
            budget_period TEXT,
            priority INTEGER NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION)""",
        # Bumped with every change of a key: gateways poll it, and reload keys when it moves.
        "CREATE TABLE revision (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO revision (id, value) VALUES (1, 0)",
        """CREATE TABLE usage (
            id TEXT PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            key_name TEXT,
            model TEXT,
            backend TEXT,
            status INTEGER NOT NULL,
            outcome TEXT,
            prompt_tokens BIGINT,
            generated_tokens BIGINT,
            queue_seconds DOUBLE PRECISION,
            seconds DOUBLE PRECISION)""",
        "CREATE INDEX usage_at ON usage (at)",
        "CREATE INDEX usage_key_at ON usage (key_name, at)",
    ),
    (  # 2: the right to manage models
        "ALTER TABLE keys ADD COLUMN manage INTEGER NOT NULL DEFAULT 0",
    ),
)
_KEY_FIELDS = (
    *("name", "key_id", "key_hash", "created_at", "models", "rpm", "tpm", "max_concurrent"),
    *("budget_tokens", "budget_period", "priority", "expires_at", "revoked_at", "manage"),
)
_KEY_COLUMNS = ", ".join(_KEY_FIELDS)


class StoreError(ParallamaError):
    """The database refused the operation, or cannot be reached (`StoreUnavailable`)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (or stopped answering): try again later."""


class KeyExists(ParallamaError):
    """A key by that name exists already (revoked or not: names are never reused)."""


class UnknownKey(ParallamaError):
    """No key by that name."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One finished request in the ledger. `id` makes a batch written twice (its commit was
    not acknowledged) count once."""

    id: str
    at: float  # when it arrived, Unix time
    key_name: str | None
    model: str | None
    backend: str | None
    status: int
    outcome: str | None
    prompt_tokens: int | None
    generated_tokens: int | None
    queue_seconds: float | None
    seconds: float | None


_ROW_COLUMNS = ", ".join(f.name for f in fields(UsageRow))


class _Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def close(self) -> None: ...


class _Dialect(Protocol):
    day: str  # SQL for the UTC day (YYYY-MM-DD) of the `at` column

    def connect(self) -> _Connection: ...
    def sql(self, text: str) -> str: ...
    def transaction(self, conn: _Connection) -> contextlib.AbstractContextManager[None]: ...
    def executemany(self, conn: _Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    def broken(self, exc: Exception) -> bool: ...


class _Sqlite:
    day = "strftime('%Y-%m-%d', at, 'unixepoch')"

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> _Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")  # readers do not wait for the writer
        conn.execute("PRAGMA synchronous = NORMAL")  # durable at each WAL checkpoint
        return conn

    def sql(self, text: str) -> str:
        return text

    @contextlib.contextmanager
    def transaction(self, conn: _Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")  # the write lock now: no upgrade deadlock later
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def executemany(self, conn: _Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        assert isinstance(conn, sqlite3.Connection)
        conn.executemany(sql, rows)

    def broken(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError)


class _Postgres:
    day = "to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self) -> _Connection:
        import psycopg

        # A server that stops answering (paused, unplugged) must not hold the thread for ever:
        # TCP keepalives and a user timeout end the connection, a statement timeout the query.
        conn: _Connection = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=5,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=10_000,
            options="-c statement_timeout=10000",
            # Text as str on a SQL_ASCII database too (initdb where no UTF-8 locale was set,
            # as in minimal containers), whose text psycopg would otherwise hand over as bytes.
            client_encoding="utf8",
        )
        return conn

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    @contextlib.contextmanager
    def transaction(self, conn: _Connection) -> Iterator[None]:
        with conn.transaction():  # type: ignore[attr-defined]
            yield

    def executemany(self, conn: _Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with conn.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.executemany(sql, rows)

    def broken(self, exc: Exception) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def dialect_of(url: str) -> _Dialect:
    """`postgresql://...` (or `postgres://`), `sqlite:///path`, or a plain file path."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError(
                "PostgreSQL needs psycopg: pip install 'parallama[postgresql]'"
            ) from None
        return _Postgres(url)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    if not path or "://" in path:
        raise StoreError(f"database {url!r}: a file path, sqlite:///path or postgresql://...")
    return _Sqlite(Path(path).expanduser())


class Store:
    """One connection, used by one thread at a time; it reconnects after a failure."""

    def __init__(self, url: str) -> None:
        self._dialect = dialect_of(url)
        self._conn: _Connection | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    # -- keys -----------------------------------------------------------------------------------

    def add_key(self, key: ApiKey) -> None:
        with self._write() as conn:
            if self._fetch(conn, "SELECT name FROM keys WHERE name = ?", (key.name,)):
                raise KeyExists(f"a key named {key.name!r} exists already")
            placeholders = ", ".join("?" * len(_KEY_FIELDS))
            self._run(conn, f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES ({placeholders})", _row(key))
            self._bump(conn)

    def update_key(self, name: str, **changes: Any) -> ApiKey:
        """Change some of a key's limits (`rpm=None` lifts that limit)."""
        with self._write() as conn:
            found = self._fetch(conn, f"SELECT {_KEY_COLUMNS} FROM keys WHERE name = ?", (name,))
            if not found:
                raise UnknownKey(f"no key named {name!r}")
            updated = dataclasses.replace(_key(found[0]), **changes)
            row = _row(updated)
            assignments = ", ".join(f"{c} = ?" for c in _KEY_FIELDS[1:])
            self._run(conn, f"UPDATE keys SET {assignments} WHERE name = ?", (*row[1:], name))
            self._bump(conn)
            return updated

    def keys(self) -> list[ApiKey]:
        with self._read() as conn:
            rows = self._fetch(conn, f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY name")
        return [_key(row) for row in rows]

    def key(self, name: str) -> ApiKey | None:
        with self._read() as conn:
            rows = self._fetch(conn, f"SELECT {_KEY_COLUMNS} FROM keys WHERE name = ?", (name,))
        return _key(rows[0]) if rows else None

    def revision(self) -> int:
        """Moves with every change of any key."""
        with self._read() as conn:
            return int(self._fetch(conn, "SELECT value FROM revision WHERE id = 1")[0][0])

    # -- the ledger -----------------------------------------------------------------------------

    def write_usage(self, rows: Sequence[UsageRow]) -> None:
        placeholders = ", ".join("?" * len(fields(UsageRow)))
        sql = self._dialect.sql(
            f"INSERT INTO usage ({_ROW_COLUMNS}) VALUES ({placeholders}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        with self._write() as conn:
            self._dialect.executemany(conn, sql, [_storable(row) for row in rows])

    def tokens_since(self, since: float) -> dict[str, int]:
        """Tokens (prompt + generated) each key used since `since`."""
        sql = (
            "SELECT key_name, SUM(COALESCE(prompt_tokens, 0) + COALESCE(generated_tokens, 0)) "
            "FROM usage WHERE at >= ? AND key_name IS NOT NULL GROUP BY key_name"
        )
        with self._read() as conn:
            return {name: int(total or 0) for name, total in self._fetch(conn, sql, (since,))}

    def usage(self, since: float, by: Sequence[str]) -> list[dict[str, Any]]:
        """Requests, tokens and times since `since`, grouped by some of `GROUPS`."""
        expressions = {
            "key": "key_name",
            "model": "model",
            "day": self._dialect.day,
            "backend": "backend",
            "outcome": "outcome",
        }
        groups = [expressions[name] for name in by]
        selected = ", ".join([*groups, ""]) if groups else ""
        sql = (
            f"SELECT {selected}COUNT(*), "
            "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
            "SUM(COALESCE(prompt_tokens, 0)), SUM(COALESCE(generated_tokens, 0)), "
            "AVG(queue_seconds), AVG(seconds) FROM usage WHERE at >= ?"
        )
        if groups:
            order = ", ".join(groups)
            sql += f" GROUP BY {order} ORDER BY {order}"
        with self._read() as conn:
            rows = self._fetch(conn, sql, (since,))
        names = [*by, "requests", "errors", "prompt_tokens", "generated_tokens"]
        names += ["queue_seconds", "seconds"]
        found = []
        for row in rows:
            entry = dict(zip(names, row, strict=True))
            if entry["requests"]:
                found.append(_plain(entry))
        return found

    def answered(self, since: float, limit: int) -> list[dict[str, Any]]:
        """The first `limit` requests since `since` that were answered (status 200), by arrival:
        their time, key, model and token counts (what a trace keeps)."""
        sql = (
            "SELECT at, key_name, model, status, prompt_tokens, generated_tokens FROM usage "
            f"WHERE at >= ? AND status = 200 ORDER BY at LIMIT {int(limit)}"
        )
        names = ("at", "key_name", "model", "status", "prompt_tokens", "generated_tokens")
        with self._read() as conn:
            return [dict(zip(names, row, strict=True)) for row in self._fetch(conn, sql, (since,))]

    # -- plumbing -------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema up to date; its version."""
        with self._write() as conn:
            if isinstance(self._dialect, _Postgres):  # SQLite's write lock is taken already
                self._run(conn, "SELECT pg_advisory_xact_lock(7213546)")
            self._run(conn, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = self._fetch(conn, "SELECT version FROM schema_version")
            version = int(rows[0][0]) if rows else 0
            if version > len(_MIGRATIONS):
                raise StoreError(
                    f"the database's schema is version {version}, newer than this parallama "
                    f"knows ({len(_MIGRATIONS)}): upgrade parallama"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    self._run(conn, statement)
            if not rows:
                self._run(conn, "INSERT INTO schema_version (version) VALUES (?)", (0,))
            self._run(conn, "UPDATE schema_version SET version = ?", (len(_MIGRATIONS),))
        return len(_MIGRATIONS)

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._lock, self._failures():
            yield self._connection()

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Connection]:
        with self._lock, self._failures():
            conn = self._connection()
            with self._dialect.transaction(conn):
                yield conn

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """A driver's error as a `StoreError`; a broken connection is dropped, to be made
        anew by the next call."""
        try:
            yield
        except ParallamaError:
            raise
        except Exception as exc:
            message = f"database: {type(exc).__name__}: {exc}".strip()
            if not self._dialect.broken(exc):
                raise StoreError(message) from exc
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            raise StoreUnavailable(message) from exc

    def _connection(self) -> _Connection:
        if self._conn is None:
            self._conn = self._dialect.connect()
        return self._conn

    def _run(self, conn: _Connection, sql: str, params: Sequence[Any] = ()) -> None:
        conn.execute(self._dialect.sql(sql), params)

    def _fetch(self, conn: _Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(conn.execute(self._dialect.sql(sql), params).fetchall())

    def _bump(self, conn: _Connection) -> None:
        self._run(conn, "UPDATE revision SET value = value + 1 WHERE id = 1")


def open_store(url: str) -> Store:
    """A store whose schema is up to date; `StoreError` if the database cannot be reached."""
    store = Store(url)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


def _storable(row: UsageRow) -> tuple[Any, ...]:
    """A row's values as both databases take them: PostgreSQL's text holds no NUL character
    (a client's model name may), so it becomes U+FFFD, as an undecodable byte would."""
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in astuple(row))


def _row(key: ApiKey) -> tuple[Any, ...]:
    budget = key.budget
    return (
        key.name,
        key.key_id,
        key.key_hash,
        key.created_at,
        ",".join(key.models),
        key.rpm,
        key.tpm,
        key.max_concurrent,
        None if budget is None else budget.tokens,
        None if budget is None else budget.period,
        key.priority,
        key.expires_at,
        key.revoked_at,
        int(key.manage),
    )


def _key(row: Sequence[Any]) -> ApiKey:
    (name, key_id, key_hash, created, models, rpm, tpm, concurrent) = row[:8]
    (budget_tokens, budget_period, priority, expires, revoked, manage) = row[8:]
    return ApiKey(
        name=name,
        key_id=key_id,
        key_hash=key_hash,
        created_at=float(created),
        models=tuple(p for p in models.split(",") if p),
        rpm=rpm,
        tpm=tpm,
        max_concurrent=concurrent,
        budget=None if budget_tokens is None else Budget(int(budget_tokens), budget_period),
        priority=int(priority),
        expires_at=expires,
        revoked_at=revoked,
        manage=bool(manage),
    )


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    """Numbers as Python's own (PostgreSQL's sums come as Decimal)."""
    for name in ("requests", "errors", "prompt_tokens", "generated_tokens"):
        entry[name] = int(entry[name] or 0)
    for name in ("queue_seconds", "seconds"):
        entry[name] = None if entry[name] is None else round(float(entry[name]), 4)
    return entry
