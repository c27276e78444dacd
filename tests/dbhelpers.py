"""A real, throwaway PostgreSQL server for tests: `initdb` into a temporary directory, `pg_ctl`
to start it on a free loopback port, removed at the end. Run as an unprivileged user (PostgreSQL
refuses to run as root: as root, the tests run it as `nobody`)."""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallama.cli import main
from parallama.launch.supervisor import free_port

_names = itertools.count()


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).parent


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    user: str | None  # whom the server runs as (None: this process's user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), *args)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.data / "server.log")
        self.pg_ctl("start", "-w", "-t", "60", "-l", log, "-o", options)

    def kill(self) -> None:
        """As a crash would: no shutdown checkpoint, connections cut."""
        self.pg_ctl("stop", "-m", "immediate", "-w")

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # a name of our own making
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *command: str) -> None:
        kwargs: dict[str, Any] = {"user": self.user} if self.user else {}
        subprocess.run(command, check=True, capture_output=True, timeout=120, **kwargs)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A started server; stopped and deleted after the block. Fails (never skips) when
    PostgreSQL is not installed: the suite is meant to run against both databases."""
    binaries = _binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    user = "nobody" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="parallama-pg-"))
    data = home / "data"
    data.mkdir()
    if user is not None:
        shutil.chown(home, user)
        shutil.chown(data, user)
    server = Postgres(binaries, data, free_port("127.0.0.1"), user)
    server._run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.pg_ctl("stop", "-m", "fast", "-w")
        shutil.rmtree(home, ignore_errors=True)


def postgres_pids(server: Postgres) -> list[int]:
    """The server's processes: the postmaster (found by its data directory) and its children
    (the backends serving each connection, the background workers)."""

    def pgrep(*args: str) -> list[int]:
        found = subprocess.run(["pgrep", *args], capture_output=True, text=True, check=False)
        return [int(pid) for pid in found.stdout.split()]

    postmasters = pgrep("-f", f"postgres -D {server.data}")
    return [*postmasters, *(child for pid in postmasters for child in pgrep("-P", str(pid)))]


def cli(*args: str) -> str:
    """`parallama ...` as a user runs it; its output (a non-zero exit fails the test)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    assert status == 0, out.getvalue()
    return out.getvalue()


def new_key(database: str, name: str, *limits: str) -> str:
    created = json.loads(cli("keys", "create", name, "--database", database, "--json", *limits))
    key: str = created["key"]
    return key
