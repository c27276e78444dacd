"""Blobs across the fleet: the official `ollama` client's `create_blob` and `create(files=...)`
through the gateway put the model on every emulated Ollama server; the blob is streamed
through to each, never held; `HEAD` tells whether every backend has it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import ollama
import pytest

from parallama.config import BackendSettings
from parallama.sim.server import SimServer
from tests.simhelpers import gateway_with, make_config, sim_servers, with_ports

MB = 1024 * 1024


def installed(url: str) -> list[str]:
    return sorted(m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"])


def test_create_from_a_local_file_reaches_every_backend(tmp_path: Path) -> None:
    blob = tmp_path / "tiny.gguf"
    blob.write_bytes(b"GGUF" + os.urandom(24 * MB))  # past max_body_bytes: never held whole
    digest = f"sha256:{hashlib.sha256(blob.read_bytes()).hexdigest()}"
    with sim_servers(with_ports(make_config(), 2)) as sims:
        backends = tuple(BackendSettings(url=s.url) for s in sims)
        with gateway_with(backends, max_body_bytes=16 * MB) as gateway:
            client = ollama.Client(host=gateway.url)
            before = httpx.head(f"{gateway.url}/api/blobs/{digest}")
            assert client.create_blob(blob) == digest
            after = httpx.head(f"{gateway.url}/api/blobs/{digest}")
            again = httpx.post(f"{gateway.url}/api/blobs/{digest}", content=blob.read_bytes())
            done = client.create(model="tiny:1b", files={"tiny.gguf": digest})
            on_each = [installed(s.url) for s in sims]
    assert before.status_code == 404
    assert after.status_code == 200
    assert again.status_code == 200  # each had it: nothing to write
    assert done.status == "success"
    assert all("tiny:1b" in names for names in on_each)


def test_a_blob_that_is_not_its_digest_is_refused_by_the_backends_alike() -> None:
    wrong = "sha256:" + "0" * 64
    with sim_servers(with_ports(make_config(), 2)) as sims:
        backends = tuple(BackendSettings(url=s.url) for s in sims)
        with gateway_with(backends) as gateway:
            refused = httpx.post(f"{gateway.url}/api/blobs/{wrong}", content=b"not that")
            malformed = httpx.post(f"{gateway.url}/api/blobs/sha256:abc", content=b"x")
            still = httpx.head(f"{sims[0].url}/api/blobs/{wrong}")
    assert refused.status_code == 400
    assert "digest mismatch" in refused.json()["error"]
    assert malformed.status_code == 400
    assert malformed.json() == {"error": "invalid digest format"}
    assert still.status_code == 404


def test_blobs_are_admin_only() -> None:
    with sim_servers(make_config()) as (sim,):
        backends = (BackendSettings(url=sim.url),)
        with gateway_with(backends, admin_token="s3cret") as gateway:
            digest = "sha256:" + hashlib.sha256(b"x").hexdigest()
            anonymous = httpx.post(f"{gateway.url}/api/blobs/{digest}", content=b"x")
            admin = httpx.post(
                f"{gateway.url}/api/blobs/{digest}",
                content=b"x",
                headers={"Authorization": "Bearer s3cret"},
            )
    assert anonymous.status_code == 401
    assert admin.status_code == 201


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_other_methods_are_not_allowed(sim: SimServer, method: str) -> None:
    with gateway_with((BackendSettings(url=sim.url),)) as gateway:
        answer = httpx.request(method, f"{gateway.url}/api/blobs/sha256:{'a' * 64}")
    assert answer.status_code == 405
