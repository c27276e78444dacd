"""The compose stack (`deploy/compose.yaml`) run with podman-compose as a team would run it: two
gateway replicas behind HAProxy on one port, sharing Redis and PostgreSQL, in front of two
emulated Ollama servers. Requests reach both replicas with one key, the ledger's rows land in
PostgreSQL, a replica killed mid-load loses no request, and one stopped (SIGTERM) finishes its
streams while the other takes the new requests.

Redis, PostgreSQL and HAProxy run from stand-ins for their official images, built on the local
Debian base (tests/e2e/images: no registry is reachable here); the parallama image is the
checkout's. The containers talk on the stack's own network; the test reaches the one port the
stack publishes, on loopback.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from parallama.launch.supervisor import free_port
from tests.containerhelpers import (
    build_once,
    build_parallama,
    needs_podman,
    podman,
    podman_settings,
)
from tests.docs import ROOT
from tests.simhelpers import CHAT_MODEL, eventually

pytestmark = needs_podman

IMAGES = ROOT / "tests" / "e2e" / "images"
ADMIN_TOKEN = "compose-test-admin-token"
PASSWORD = "compose-test-password"
GATEWAYS = ("gateway-1", "gateway-2")
SHORT = {"model": CHAT_MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 8}}


@dataclass
class Stack:
    project: str
    url: str
    key: str

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def generate(self, body: dict[str, Any] = SHORT, key: str = "") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.post(f"{self.url}/api/generate", json=body, headers=headers, timeout=60)

    def ledger_rows(self, key_name: str = "team") -> int:
        """Rows of one key in PostgreSQL's usage table, read inside its container."""
        count = f"SELECT count(*) FROM usage WHERE key_name = '{key_name}'"
        return int(
            podman(
                "exec",
                "-e",
                f"PGPASSWORD={PASSWORD}",
                self.container("postgres"),
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "parallama",
                "-d",
                "parallama",
                "-tAc",
                count,
            )
        )

    def metric(self, gateway: str, name: str, having: str = "") -> float:
        """A metric's sum over its series (those with `having` in their labels), from a
        replica's own /metrics, read inside its container."""
        fetch = (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:11500/metrics', timeout=5).read().decode())"
        )
        text = podman("exec", self.container(gateway), "python3", "-c", fetch)
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and having in line
        )

    def answered_by(self, gateway: str) -> float:
        return self.metric(gateway, "parallama_requests_total", 'outcome="completed"')

    def in_rotation(self) -> bool:
        """Whether the front sends requests to both replicas: 8 requests at once reach each."""
        served = {g: self.answered_by(g) for g in GATEWAYS}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: self.generate().status_code, range(8)))
        assert statuses == [200] * 8
        return all(self.answered_by(g) > served[g] for g in GATEWAYS)

    def ready(self, gateway: str) -> bool:
        probe = (
            "import urllib.request, sys; sys.exit(urllib.request.urlopen("
            "'http://127.0.0.1:11500/parallama/ready', timeout=2).status != 200)"
        )
        found = ["podman", "exec", self.container(gateway), "python3", "-c", probe]
        return subprocess.run(found, capture_output=True, check=False).returncode == 0


# Emulated answers of a fixed length (300 tokens, about 5 s), so that a replica is stopped while
# its streams run: an override file as a team would add one, beside the stack's own.
OVERRIDE = """
services:
  engine-1: &engine
    entrypoint: [parallama, sim, --host, 0.0.0.0, --port, "11434", --num-parallel, "4",
                 --output-tokens, "300"]
  engine-2: *engine
"""
TOKENS = 300


def compose(project: str, *args: str, env: dict[str, str]) -> str:
    command = [sys.executable, "-m", "podman_compose", "-p", project]
    command += ["-f", str(ROOT / "deploy" / "compose.yaml"), "-f", env["OVERRIDE"], *args]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"podman-compose {args[0]} failed: {done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    override = tmp_path_factory.mktemp("compose") / "compose.override.yaml"
    override.write_text(OVERRIDE)
    with podman_settings():
        port = free_port("127.0.0.1")
        env = {
            **os.environ,
            "OVERRIDE": str(override),
            "PARALLAMA_IMAGE": build_parallama(),
            "PARALLAMA_REDIS_IMAGE": build_once("parallama-test-redis", IMAGES / "redis"),
            "PARALLAMA_POSTGRES_IMAGE": build_once("parallama-test-postgres", IMAGES / "postgres"),
            "PARALLAMA_HAPROXY_IMAGE": build_once("parallama-test-haproxy", IMAGES / "haproxy"),
            "PARALLAMA_PUBLISH": f"127.0.0.1:{port}",
            "PARALLAMA_ADMIN_TOKEN": ADMIN_TOKEN,
            "POSTGRES_PASSWORD": PASSWORD,
        }
        project = f"parallama-test-{os.getpid()}"
        url = f"http://127.0.0.1:{port}"
        compose(project, "up", "-d", "--no-build", env=env)
        try:
            stack = Stack(project, url, key="")
            eventually(lambda: all(stack.ready(g) for g in GATEWAYS), bool, 120)
            key = eventually(lambda: made_key(url, "team"), lambda made: made is not None, 60)
            assert key is not None
            stack.key = key
            yield stack
        finally:
            compose(project, "down", "-v", env=env)


def made_key(url: str, name: str) -> str | None:
    """A new key, made with the admin token (the front is not on the gateways' loopback)."""
    try:
        answer = httpx.post(
            f"{url}/parallama/keys",
            json={"name": name},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )
    except httpx.TransportError:
        return None
    key: str | None = answer.json()["key"] if answer.status_code == 201 else None
    return key


def test_both_replicas_serve_one_key_and_write_one_ledger(stack: Stack) -> None:
    before = stack.ledger_rows()
    served = {g: stack.answered_by(g) for g in GATEWAYS}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: stack.generate(), range(24)))
    assert [a.status_code for a in answers] == [200] * 24
    assert all(a.json()["done"] for a in answers)
    for gateway, earlier in served.items():
        assert stack.answered_by(gateway) > earlier, f"{gateway} answered none"
    eventually(stack.ledger_rows, lambda rows: rows == before + 24, 30)
    assert httpx.get(f"{stack.url}/api/tags").status_code == 401  # keys on both replicas


def test_a_replica_killed_mid_load_loses_no_request(stack: Stack) -> None:
    before = stack.ledger_rows()
    answers: list[tuple[float, int]] = []
    killed_at: list[float] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status = stack.generate().status_code
            answers.append((time.monotonic(), status))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client) for _ in range(4)]
        eventually(lambda: len(answers), lambda n: n >= 20, 60)
        podman("kill", "--signal", "KILL", stack.container("gateway-1"))
        killed_at.append(time.monotonic())
        eventually(lambda: len(answers), lambda n: n >= 60, 120)
        stop.set()
        for done in running:
            done.result()
    assert [status for _, status in answers] == [200] * len(answers)
    # SIGKILL takes what the killed replica had not written yet: at most its last second's rows
    # (the ledger writes every second). Nothing is written twice.
    recent = sum(1 for at, _ in answers if killed_at[0] - 1.5 <= at <= killed_at[0])
    rows = eventually(
        lambda: stack.ledger_rows() - before, lambda n: n >= len(answers) - recent, 30
    )
    assert rows <= len(answers)
    podman("start", stack.container("gateway-1"), check=False)  # unless its policy did
    eventually(lambda: stack.ready("gateway-1"), bool, 60)


def test_a_replica_stopped_finishes_its_streams_while_the_other_serves(stack: Stack) -> None:
    eventually(stack.in_rotation, bool, 60)
    key = made_key(stack.url, "drain")  # its rows are this test's alone
    assert key is not None
    body = {"model": CHAT_MODEL, "prompt": "count"}
    headers = {"Authorization": f"Bearer {key}"}
    started = threading.Barrier(5)

    def stream() -> list[dict[str, Any]]:
        with httpx.stream(
            "POST", f"{stack.url}/api/generate", json=body, headers=headers, timeout=60
        ) as answer:
            lines = answer.iter_lines()
            first = orjson.loads(next(lines))
            started.wait(30)
            return [first, *(orjson.loads(line) for line in lines if line)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream) for _ in range(4)]
        started.wait(30)  # four streams under way, spread over the replicas (leastconn)
        streaming = [g for g in GATEWAYS if stack.metric(g, "parallama_backend_in_flight") > 0]
        assert streaming, "no replica has a stream in flight"
        stopped = stack.container(streaming[0])
        stopping = subprocess.Popen(["podman", "stop", "--time", "30", stopped])
        during = [stack.generate(key=key).status_code for _ in range(10)]
        finished = [s.result() for s in streams]
        assert stopping.wait(60) == 0
    assert during == [200] * 10
    for lines in finished:
        assert lines[-1].get("done") is True, lines[-1]
        assert len(lines) == TOKENS + 1  # and the final line
    assert podman("inspect", "--format", "{{.State.ExitCode}}", stopped) == "0"
    # drained: every row written, the stopped replica's too
    eventually(lambda: stack.ledger_rows("drain"), lambda rows: rows == 14, 30)
    podman("start", stopped, check=False)  # unless its policy did
    eventually(lambda: stack.ready(streaming[0]), bool, 60)
