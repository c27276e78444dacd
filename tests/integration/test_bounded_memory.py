"""Nothing a client sends stays in the gateway: what it keeps of a request (names in caches,
labels, log fields, texts) is bounded in bytes, however many distinct or huge values come.
Measured as a user would: the resident memory of a running `parallama demo`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.launchhelpers import sim_process

MB = 1024 * 1024


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[int, str]]:
    """A running demo (gateway and emulated backends in one process): its pid and address."""
    with sim_process("--port", "0", "--profile", "fast", command="demo") as (process, urls):
        yield process.pid, urls[0]


def resident(pid: int) -> int:
    """The process's resident memory in bytes, as `ps` and `top` show it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def big_name(n: int) -> str:
    """2 MB names, every other one as a "scheme" (which Ollama drops from a name)."""
    return f"{n:04d}" + "m" * (2 * MB) + ("://m" if n % 2 else "")


ROUTES = {
    "/api/chat": lambda name: {"model": name, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/chat/completions": lambda name: {
        "model": name,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/messages": lambda name: {
        "model": name,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
    },
}


def test_distinct_huge_model_names_are_refused_and_not_kept(demo: tuple[int, str]) -> None:
    """Each 2 MB name is a 400 in the route's dialect; 120 of them leave the gateway's memory
    where a few of them put it (a cache keyed by whole names kept every one: +240 MB)."""
    pid, url = demo
    with httpx.Client(base_url=url, timeout=30) as client:

        def send_all(start: int, count: int) -> None:
            for n in range(start, start + count):
                path = list(ROUTES)[n % len(ROUTES)]
                answer = client.post(path, json=ROUTES[path](big_name(n)))
                assert answer.status_code == 400, (path, answer.status_code)
                assert len(answer.content) < 4096  # the name is not echoed back whole

        send_all(0, 12)  # the allocator's working set for such requests
        before = resident(pid)
        send_all(12, 120)
        grown = resident(pid) - before
    assert grown < 48 * MB, f"resident memory grew {grown / MB:.0f} MB"
