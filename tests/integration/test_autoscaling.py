"""`parallama up` with an autoscaled group of emulated engines: none runs until a request
waits, another starts while requests keep waiting, idle ones stop, and each decision is in the
log, the status page and `/metrics`."""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.browser import browser_page, needs_chromium
from tests.launchhelpers import alive, running_up
from tests.simhelpers import CHAT_MODEL, wait_for_gateway

GENERATE = {"model": CHAT_MODEL, "prompt": "x", "stream": False}
# The emulator at 50 tokens/s and 40 tokens an answer: 0.8 s a request, one at a time.
SLOW_SIM = '["--load-seconds", "0", "--decode-tps", "50", "--output-tokens", "40"]'


def write_config(tmp_path: Path, engine: str, autoscale: str, gateway: str = "") -> Path:
    path = tmp_path / "up.toml"
    path.write_text(
        f"health_interval = 0.2\n{gateway}\n[[instances]]\nport = 0\n{engine}\n"
        f"[instances.autoscale]\n{autoscale}\n"
    )
    return path


def autoscaling_of(url: str) -> dict[str, Any]:
    group: dict[str, Any] = httpx.get(f"{url}/parallama/status").json()["autoscaling"][0]
    return group


def test_engines_start_when_requests_wait_and_stop_when_idle(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f'engine = "sim"\nnum_parallel = 1\nargs = {SLOW_SIM}',
        "min = 0\nmax = 2\nwait_up = 0.3\nsustain = 0.5\nidle_after = 1.5\ncooldown = 0.3",
    )
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        # Nothing runs at first.
        assert "instance sim-0.1  stopped until needed" in "\n".join(up.output)
        status = httpx.get(f"{up.url}/parallama/status").json()
        assert [(i["name"], i["state"]) for i in status["instances"]] == [
            ("sim-0.1", "stopped"),
            ("sim-0.2", "stopped"),
        ]
        assert status["autoscaling"][0]["engines"] == 0

        # From zero: the request waits in the queue while an engine starts, then is answered.
        reply = httpx.post(f"{up.url}/api/generate", json=GENERATE, timeout=60)
        assert reply.status_code == 200, reply.text
        assert int(reply.headers["X-Queue-Wait-Ms"]) > 0
        first = autoscaling_of(up.url)["decisions"][0]
        assert (first["action"], first["instance"]) == ("start", "sim-0.1")
        assert first["reason"] == "a request waits that no engine can take"

        # A burst on one slot: requests keep waiting, so the second engine starts too.
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda _: httpx.post(f"{up.url}/api/generate", json=GENERATE, timeout=60),
                    range(8),
                )
            )
        assert [r.status_code for r in replies] == [200] * 8
        decisions = autoscaling_of(up.url)["decisions"]
        started = [d for d in decisions if d["action"] == "start"]
        assert "sim-0.2" in {d["instance"] for d in started}
        assert any(d["reason"].startswith("requests waited over 0.3 s") for d in started)
        pids = {
            i["name"]: i["pid"] for i in httpx.get(f"{up.url}/parallama/status").json()["instances"]
        }

        # Idle: both stop again, down to min = 0, and their processes are gone.
        status = wait_for_gateway(up.url, lambda s: s["autoscaling"][0]["engines"] == 0, timeout=30)
        assert [i["state"] for i in status["instances"]] == ["stopped", "stopped"]
        assert not [pid for pid in pids.values() if pid is not None and alive(pid)]
        stops = [d for d in status["autoscaling"][0]["decisions"] if d["action"] == "stop"]
        assert {d["instance"] for d in stops} >= {"sim-0.1", "sim-0.2"}
        assert {d["reason"] for d in stops} == {"idle for 1.5 s"}

        metrics = httpx.get(f"{up.url}/metrics").text
        assert 'parallama_autoscale_engines{group="sim-0"} 0.0' in metrics
        assert 'parallama_autoscale_limit{group="sim-0",limit="max"} 2.0' in metrics
        counted = {
            line.split("{")[1].split(",")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("parallama_autoscale_decisions_total{")
        }
        assert counted['action="start"'] >= 2 and counted['action="stop"'] >= 2
    log = up.log.read_text()
    assert 'event=autoscaling group=sim-0 action=start instance=sim-0.2 reason="requests' in log
    assert 'action=stop instance=sim-0.1 reason="idle for 1.5 s"' in log


def test_an_engine_that_cannot_start_is_retried_later_and_its_request_times_out(
    tmp_path: Path,
) -> None:
    broken = '["' + sys.executable + '", "-c", "import sys; print(\'no GPU\'); sys.exit(3)"]'
    config = write_config(
        tmp_path,
        f'engine = "command"\ncommand = {broken}',
        "max = 1",
        gateway="queue_timeout = 4",
    )
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        reply = httpx.post(f"{up.url}/api/generate", json=GENERATE, timeout=60)
        assert reply.status_code == 503
        assert "error" in reply.json()
        assert int(reply.headers["Retry-After"]) >= 1
        status = httpx.get(f"{up.url}/parallama/status").json()
        instance = status["instances"][0]
        assert instance["state"] == "stopped"
        assert "exited with code 3 before it served" in instance["last_error"]
        assert "no GPU" in instance["last_error"]
        starts = status["autoscaling"][0]["decisions"]
        # Tried again, but not in a loop: a second start waits 1 s, a third 2 s more.
        assert 2 <= len(starts) <= 4, starts
    assert "autoscaling start failed" in up.log.read_text()


@needs_chromium
def test_the_dashboard_shows_each_engine_and_the_last_decision(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        'engine = "sim"\nargs = ["--load-seconds", "0"]',
        "min = 0\nmax = 2\nidle_after = 600",
    )
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        assert httpx.post(f"{up.url}/api/generate", json=GENERATE, timeout=60).status_code == 200

        async def shown() -> tuple[list[str], list[str], str, list[str]]:
            async with browser_page() as page:
                await page.open(f"{up.url}/parallama/")
                rows = "Array.from(document.querySelectorAll('#%s tbody tr[data-key]'))"
                instances: list[str] = await page.until(
                    f"{rows % 'instances'}.length === 2 && {rows % 'instances'}"
                    ".map(r => r.dataset.key + ' ' + r.querySelector('.pill').className)"
                )
                backends: list[str] = await page.until(
                    f"{rows % 'backends'}.length === 2 && {rows % 'backends'}"
                    ".map(r => r.querySelector('.pill').textContent).sort()"
                )
                group: str = await page.until(
                    "(document.querySelector('#autoscaling tr[data-key=\"sim-0\"]') || {})"
                    ".innerText"
                )
                return instances, backends, group, page.errors

        instances, backends, group, errors = asyncio.run(shown())
        assert instances == ["sim-0.1 pill ready", "sim-0.2 pill stopped"]
        assert backends == ["healthy", "standby"]
        assert group.split("\t")[:3] == ["sim-0", "1", "0 to 2"]
        assert "start sim-0.1: a request waits that no engine can take" in group
        assert errors == []
