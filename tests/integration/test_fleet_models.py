"""Model management across the fleet: one pull through the gateway installs a model on every
emulated Ollama server, its progress merged into one stream; admin only."""

from __future__ import annotations

import json

import httpx

from parallama.config import BackendSettings
from tests.simhelpers import (
    CHAT_MODEL,
    eventually,
    gateway_with,
    make_config,
    sim_servers,
    with_ports,
)


def installed(url: str) -> list[str]:
    return sorted(m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"])


def test_a_pull_reaches_every_backend_and_its_progress_is_one_stream() -> None:
    with sim_servers(with_ports(make_config(), 3)) as sims:
        backends = tuple(BackendSettings(url=s.url) for s in sims)
        with gateway_with(backends) as gateway:
            url = gateway.url
            with httpx.stream("POST", f"{url}/api/pull", json={"model": "mistral:7b"}) as pull:
                assert pull.headers["content-type"] == "application/x-ndjson"
                lines = [json.loads(line) for line in pull.iter_lines() if line]
            listed = eventually(  # the gateway's own listing follows, once it probed them
                lambda: [m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]],
                lambda names: "mistral:7b" in names,
            )
            copied = httpx.post(
                f"{url}/api/copy",
                json={"source": "mistral:7b", "destination": "mine"},
                headers={"X-Parallama-Backends": sims[0].url},
            )
            deleted = httpx.request("DELETE", f"{url}/api/delete", json={"model": "mistral:7b"})
            again = httpx.request("DELETE", f"{url}/api/delete", json={"model": "mistral:7b"})
            on_each = [installed(s.url) for s in sims]
    urls = {s.url for s in sims}
    *progress, summary = lines
    assert {line["backend"] for line in progress} == urls  # each line says whose it is
    assert {line["backend"] for line in progress if line["status"] == "success"} == urls
    assert any("completed" in line for line in progress)  # the download's progress, relayed
    assert summary == {"status": "success", "backends": dict.fromkeys(urls, "success")}
    assert "mistral:7b" in listed
    assert copied.status_code == 200 and copied.json()["backends"] == {sims[0].url: "success"}
    assert deleted.status_code == 200
    assert again.status_code == 502  # no backend had it any more: each says why
    assert again.json()["backends"][sims[1].url] == "model 'mistral:7b' not found"
    assert "3 of 3 backends failed" in again.json()["error"]
    assert on_each[0] == sorted([*installed_default(), "mine:latest"])
    assert on_each[1] == on_each[2] == installed_default()


def installed_default() -> list[str]:
    return sorted([CHAT_MODEL, "llama3.2:3b", "nomic-embed-text:latest"])


def test_model_management_is_for_admins_only() -> None:
    with sim_servers(with_ports(make_config(), 1)) as sims:
        backends = (BackendSettings(url=sims[0].url),)
        with gateway_with(backends, admin_token="s3cret") as gateway:
            refused = httpx.post(f"{gateway.url}/api/pull", json={"model": "mistral:7b"})
            allowed = httpx.post(
                f"{gateway.url}/api/pull",
                json={"model": "mistral:7b", "stream": False},
                headers={"Authorization": "Bearer s3cret"},
            )
            on_backend = installed(sims[0].url)
    assert refused.status_code == 401 and "admin" in refused.json()["error"]
    assert allowed.status_code == 200 and allowed.json()["status"] == "success"
    assert "mistral:7b" in on_backend


def test_the_official_client_pulls_and_deletes_through_the_gateway() -> None:
    import ollama

    with sim_servers(with_ports(make_config(), 2)) as sims:
        backends = tuple(BackendSettings(url=s.url) for s in sims)
        with gateway_with(backends) as gateway:
            client = ollama.Client(host=gateway.url)
            parts = list(client.pull("mistral:7b", stream=True))
            pulled = [installed(s.url) for s in sims]
            deleted = client.delete("mistral:7b")
            left = [installed(s.url) for s in sims]
    assert parts[-1].status == "success"
    assert all("mistral:7b" in names for names in pulled)
    assert deleted.status == "success"
    assert all("mistral:7b" not in names for names in left)
