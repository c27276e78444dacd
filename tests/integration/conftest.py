"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from parallama.sim.server import SimServer
from tests.dbhelpers import Postgres, postgres_server
from tests.redishelpers import RedisServer, redis_server
from tests.simhelpers import sim_server


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    """One emulated Ollama server in the fast default configuration, shared by a module's
    tests (those that need another configuration start their own)."""
    with sim_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL server for the whole run (each test takes a database of its
    own on it)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind: the teams tests run against both."""
    if request.param == "sqlite":
        return str(tmp_path / "parallama.db")
    server: Postgres = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A real redis-server of its own, on a free loopback port, in a temporary directory."""
    with redis_server() as server:
        yield server
