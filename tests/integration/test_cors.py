"""Web pages on other origins, as Ollama admits them: its default origins and `allowed_origins`
(its `OLLAMA_ORIGINS`), preflights answered by the gateway, `Access-Control-*` on answers; a
page of an origin not admitted is refused. Over httpx, and in a real headless Chromium."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import orjson
import pytest
from aiohttp import web

from parallama.gateway.app import Gateway
from parallama.sim.server import SimServer
from tests.browser import browser_page, needs_chromium
from tests.simhelpers import CHAT_MODEL, gateway_for

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture(scope="module")
def gateway(sim: SimServer) -> Iterator[Gateway]:
    with gateway_for([sim], allowed_origins="https://chat.example.com,chrome-extension://*") as gw:
        yield gw


def preflight(gateway: Gateway, origin: str, path: str = "/api/chat") -> httpx.Response:
    return httpx.options(
        f"{gateway.url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
        timeout=10,
    )


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:3000",
        "http://127.0.0.1:8080",
        "https://localhost",
        "app://obsidian.md",
        "vscode-webview://1a2b3c",
        "tauri://localhost",
        "https://chat.example.com",
        "chrome-extension://abcdefghijklmnop",
    ],
)
def test_an_admitted_origin_gets_its_preflight_and_its_answer(
    gateway: Gateway, origin: str
) -> None:
    asked = preflight(gateway, origin)
    assert asked.status_code == 204
    assert asked.headers["access-control-allow-origin"] == origin
    assert "POST" in asked.headers["access-control-allow-methods"]
    allowed = asked.headers["access-control-allow-headers"].split(", ")
    assert {"content-type", "authorization"} <= set(allowed)
    answer = httpx.post(f"{gateway.url}/api/chat", json=CHAT, headers={"Origin": origin})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == origin
    assert answer.headers["vary"] == "Origin"
    assert answer.json()["message"]["content"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://localhost.evil.example",
        "null",
        "https://chat.example.com.evil",
    ],
)
def test_another_origin_is_refused_before_anything_runs(gateway: Gateway, origin: str) -> None:
    before = httpx.get(f"{gateway.url}/parallama/status").json()["total"]
    asked = preflight(gateway, origin)
    answer = httpx.post(f"{gateway.url}/api/chat", json=CHAT, headers={"Origin": origin})
    openai = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"Origin": origin})
    assert asked.status_code == answer.status_code == openai.status_code == 403
    assert "access-control-allow-origin" not in answer.headers
    assert "allowed_origins" in answer.json()["error"]
    assert "allowed_origins" in openai.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/parallama/status").json()["total"] == before


def test_any_origin_when_told_so(sim: SimServer) -> None:
    with gateway_for([sim], allowed_origins="*") as gateway:
        answer = httpx.post(
            f"{gateway.url}/api/chat", json=CHAT, headers={"Origin": "https://anywhere.example"}
        )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "*"


def test_a_request_without_origin_or_from_the_gateways_own_page_is_not_cross_origin(
    gateway: Gateway,
) -> None:
    plain = httpx.post(f"{gateway.url}/api/chat", json=CHAT, timeout=10)
    own = httpx.post(
        f"{gateway.url}/api/chat", json=CHAT, headers={"Origin": gateway.url}, timeout=10
    )
    assert plain.status_code == own.status_code == 200
    assert "access-control-allow-origin" not in plain.headers
    assert "access-control-allow-origin" not in own.headers


PAGE = """<!doctype html><title>a chat page</title><script>
fetch(%s, {method: "POST", headers: {"Content-Type": "application/json"}, body: %s})
  .then(r => r.json())
  .then(j => { window.outcome = "answered: " + j.message.content; })
  .catch(e => { window.outcome = "refused: " + e; });
</script>"""


async def outcome_in_a_page(gateway: Gateway, name: str) -> str:
    """What a page served from http://NAME:PORT sees when it posts to the gateway."""
    chat = f"{gateway.url}/api/chat"
    html = PAGE % (orjson.dumps(chat).decode(), orjson.dumps(orjson.dumps(CHAT).decode()).decode())

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with browser_page(names=[name]) as tab:
            await tab.open(f"http://{name}:{port}/")
            outcome: str = await tab.until("window.outcome")
            return outcome
    finally:
        await runner.cleanup()


@needs_chromium
def test_a_page_of_an_allowed_origin_calls_the_gateway_and_another_is_refused(
    sim: SimServer,
) -> None:
    with gateway_for([sim], allowed_origins="http://chat.test:*") as gateway:
        allowed = asyncio.run(outcome_in_a_page(gateway, "chat.test"))
        refused = asyncio.run(outcome_in_a_page(gateway, "other.test"))
    assert allowed.startswith("answered: ")
    assert len(allowed) > len("answered: ")
    assert refused.startswith("refused: TypeError")
