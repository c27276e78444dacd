"""The live dashboard in a real browser (headless Chromium) over emulated backends, and its
feed over plain HTTP."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import httpx
import pytest

from parallama.config import BackendSettings
from tests.browser import browser_page, needs_chromium
from tests.simhelpers import CHAT_MODEL, gateway_with, make_config, sim_servers, with_ports

ARTIFACTS = Path(os.environ.get("PARALLAMA_TEST_ARTIFACTS", "test-artifacts"))
GENERATE = {"model": CHAT_MODEL, "prompt": "hi", "stream": False}


@needs_chromium
def test_the_page_shows_every_backend_and_follows_a_burst_of_1000() -> None:
    # 4 slots, answers of about 50 ms: 1,000 requests take about 13 s to drain.
    config = with_ports(make_config(decode_tps=400.0, output_tokens=(20, 20), num_parallel=2), 2)
    with sim_servers(config) as sims:
        backends = tuple(BackendSettings(url=s.url, slots=2) for s in sims)
        with gateway_with(backends) as gateway:

            async def scenario() -> tuple[list[int], list[str], int, int, bytes]:
                async with browser_page() as page:
                    await page.open(f"{gateway.url}/parallama/")
                    await page.until("document.getElementById('status').className === 'live'")
                    shown: list[str] = await page.until(
                        "Array.from(document.querySelectorAll('#backends tbody tr'))"
                        ".map(r => r.dataset.key).filter(Boolean).length === 2 &&"
                        "Array.from(document.querySelectorAll('#backends tbody tr'))"
                        ".map(r => r.dataset.key)"
                    )
                    queued = (
                        f"(document.querySelector('#models tr[data-key=\"{CHAT_MODEL}\"] .queued')"
                        " || {}).textContent"
                    )
                    # aiohttp for the burst: httpx's pool, with 1,000 requests waiting on it,
                    # spends seconds of this loop's time per second and starves the page.
                    connector = aiohttp.TCPConnector(limit=200)  # within any file limit
                    async with aiohttp.ClientSession(connector=connector) as client:

                        async def generate() -> int:
                            url = f"{gateway.url}/api/generate"
                            async with client.post(url, json=GENERATE) as answer:
                                await answer.read()
                                return answer.status

                        burst = asyncio.gather(*(generate() for _ in range(1000)))
                        peak = int(await page.until(f"Number({queued}) > 10 && {queued}"))
                        shot = await page.screenshot()  # mid-burst: the queue, the slots full
                        statuses = await burst
                    await page.until(f"{queued} === '0'", seconds=90)
                    completed = int(
                        await page.until(
                            "document.querySelector('[data-total=completed] b').textContent"
                            " === '1000' && '1000'"
                        )
                    )
                    assert sorted(shown) == sorted(b.url for b in backends)
                    return statuses, page.errors, peak, completed, shot

            statuses, errors, peak, completed, shot = asyncio.run(scenario())
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard.png").write_bytes(shot)
    assert statuses == [200] * 1000
    assert errors == []  # nothing in the browser's console
    assert peak > 10 and completed == 1000
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_the_feed_is_a_snapshot_a_second_and_answers_only_admins() -> None:
    config = with_ports(make_config(), 1)
    with (
        sim_servers(config) as sims,
        gateway_with((BackendSettings(url=sims[0].url),), admin_token="s3cret") as gateway,
    ):
        assert httpx.post(f"{gateway.url}/api/generate", json=GENERATE).status_code == 200
        refused = httpx.get(f"{gateway.url}/parallama/snapshot")
        assert refused.status_code == 401
        admin = {"Authorization": "Bearer s3cret"}
        events = []
        with httpx.stream(
            "GET", f"{gateway.url}/parallama/feed", headers=admin, timeout=10
        ) as feed:
            assert feed.headers["content-type"] == "text/event-stream"
            for line in feed.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 2:
                    break
        page = httpx.get(f"{gateway.url}/parallama/")
    assert page.status_code == 200 and "<title>parallama</title>" in page.text
    assert "http" not in page.text.split("<script>")[1].replace("http://127", "")  # no CDN
    latest = events[-1]
    assert events[1]["time"] - events[0]["time"] == pytest.approx(1.0, abs=0.5)
    assert latest["totals"]["completed"] == 1
    (model,) = latest["models"]
    assert model["name"] == CHAT_MODEL and model["latency_p50"] > 0
    assert latest["backends"][0]["requests_per_second"] > 0
