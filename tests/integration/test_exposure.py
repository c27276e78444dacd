"""What the gateway tells whom, when it listens beyond loopback: a client on another address
gets the models (with a key where keys are required) and nothing about the fleet's insides
(backend addresses, engine process ids, log paths) without the admin token."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from parallama.gateway.app import Gateway
from parallama.sim.server import SimServer
from tests.simhelpers import gateway_for


def outside_address() -> str:
    """An address of this machine that is not loopback: a client connecting from it is, to
    the gateway, a client on the network. Traffic to it stays inside this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # a UDP connect sends nothing: it only picks a route
        address: str = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    return address


@pytest.fixture(scope="module")
def address() -> str:
    return outside_address()


@pytest.fixture
def open_gateway(sim: SimServer) -> Iterator[Gateway]:
    with gateway_for([sim], host="0.0.0.0", admin_token="s3cret") as gateway:
        yield gateway


def test_status_from_the_network_needs_the_admin_token(open_gateway: Gateway, address: str) -> None:
    from_outside = f"http://{address}:{open_gateway.port}/parallama/status"
    anonymous = httpx.get(from_outside, timeout=10)
    spoofed = httpx.get(
        from_outside,
        headers={"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Host": "localhost"},
        timeout=10,
    )
    admin = httpx.get(from_outside, headers={"Authorization": "Bearer s3cret"}, timeout=10)
    local = httpx.get(f"http://127.0.0.1:{open_gateway.port}/parallama/status", timeout=10)
    assert anonymous.status_code == spoofed.status_code == 401
    assert "127.0.0.1" not in anonymous.text
    assert anonymous.json()["error"]
    assert admin.status_code == local.status_code == 200
    assert admin.json()["backends"][0]["url"].startswith("http://127.0.0.1:")


def test_without_a_token_status_answers_loopback_clients_only(sim: SimServer, address: str) -> None:
    with gateway_for([sim], host="0.0.0.0") as gateway:
        refused = httpx.get(f"http://{address}:{gateway.port}/parallama/status", timeout=10)
        local = httpx.get(f"http://127.0.0.1:{gateway.port}/parallama/status", timeout=10)
        models = httpx.get(f"http://{address}:{gateway.port}/api/tags", timeout=10)
    assert refused.status_code == 403
    assert local.status_code == models.status_code == 200
