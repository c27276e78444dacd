"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from parallama.sim.server import SimServer
from tests.simhelpers import sim_server


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    """One emulated Ollama server in the fast default configuration, shared by a module's
    tests (those that need another configuration start their own)."""
    with sim_server() as server:
        yield server
