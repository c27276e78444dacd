"""A real headless Chromium for tests, driven over the DevTools protocol (the protocol Playwright
and Puppeteer speak, here over aiohttp's WebSocket client): open a page, read it with JavaScript,
collect its console errors, take a screenshot. Started in a temporary profile, kept off the
network but for loopback, and stopped by its process id."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

_QUIET = [  # nothing but the page under test: no updates, sync, metrics or lookups (below)
    "--headless=new",
    "--no-sandbox",  # tests may run as root
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--window-size=1280,900",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Skipped without Chromium, unless PARALLAMA_REQUIRE_BROWSER is set (as CI does): then it fails.
needs_chromium = pytest.mark.skipif(
    chromium() is None and not os.environ.get("PARALLAMA_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)


class Page:
    def __init__(self, socket: aiohttp.ClientWebSocketResponse, session: str) -> None:
        self._socket = socket
        self._session = session
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.errors: list[str] = []  # console errors and uncaught exceptions, as the page saw
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = answer
        await self._socket.send_json(
            {"id": message_id, "method": method, "params": params, "sessionId": self._session}
        )
        async with asyncio.timeout(20):
            return await answer

    def next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        event = asyncio.get_running_loop().create_future()
        self._events.setdefault(method, []).append(event)
        return event

    async def open(self, url: str) -> None:
        loaded = self.next_event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        async with asyncio.timeout(20):
            await loaded

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def until(self, expression: str, seconds: float = 15.0) -> Any:
        """The value of `expression` once it is truthy (the page updates by itself: ask it)."""
        deadline = time.monotonic() + seconds
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"never true in the page: {expression}")
            await asyncio.sleep(0.05)

    async def screenshot(self) -> bytes:
        """The page as a PNG."""
        shot = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = message.json()
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data.get("result", data))
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(str([a.get("value") for a in params.get("args", [])]))
            elif method == "Runtime.exceptionThrown":
                self.errors.append(str(params.get("exceptionDetails", {}).get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                self.errors.append(str(params["entry"].get("text")))
            for waiter in self._events.pop(method, []):
                if not waiter.done():
                    waiter.set_result(params)


@contextlib.asynccontextmanager
async def browser_page(names: Sequence[str] = ()) -> AsyncIterator[Page]:
    """A new page in a headless Chromium of its own; `names` resolve to 127.0.0.1 (a page
    of another origin on this machine), every other name to nothing."""
    rules = [*(f"MAP {name} 127.0.0.1" for name in names), "MAP * ~NOTFOUND", "EXCLUDE 127.0.0.1"]
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium")
    profile = Path(tempfile.mkdtemp(prefix="parallama-chromium-"))
    process = await asyncio.create_subprocess_exec(
        *[binary, *_QUIET, f"--host-resolver-rules={' , '.join(rules)}"],
        *["--remote-debugging-port=0", f"--user-data-dir={profile}"],
        "about:blank",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not active.exists() or len(active.read_text().splitlines()) < 2:
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start")
            await asyncio.sleep(0.05)
        port, path = active.read_text().splitlines()[:2]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=64 * 2**20) as socket,
        ):
            await socket.send_json(
                {"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}
            )
            target = (await socket.receive_json())["result"]["targetId"]
            await socket.send_json(
                {
                    "id": 2,
                    "method": "Target.attachToTarget",
                    "params": {"targetId": target, "flatten": True},
                }
            )
            session = ""
            while not session:  # the attachment's event may come before the answer
                message = await socket.receive_json()
                session = message.get("result", message.get("params", {})).get("sessionId", "")
            page = Page(socket, session)
            for domain in ("Page", "Runtime", "Log"):
                await page.send(f"{domain}.enable")
            try:
                yield page
            finally:
                page._reader.cancel()
    finally:
        process.terminate()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        shutil.rmtree(profile, ignore_errors=True)
