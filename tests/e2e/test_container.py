"""The container image (`Containerfile`) built and run with podman, as a team would run it: it
serves through the real gateway inside, as a user that is not root, its HEALTHCHECK passes, and
`podman stop` (SIGTERM) lets a stream in flight finish before the container exits 0.

The image is built on a Debian base made here (tests/containerhelpers.py says why and what
podman needs); the container shares the host's network, so that every request stays on
loopback.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from parallama.launch.supervisor import free_port
from tests.containerhelpers import build_parallama, needs_podman, podman, podman_settings
from tests.simhelpers import CHAT_MODEL, eventually, sim_server

pytestmark = needs_podman


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image, built from the checkout on the local base."""
    with podman_settings():
        yield build_parallama()


def _started(image: str, backend: str, port: int) -> str:
    environment = {
        "PARALLAMA_BACKENDS": backend,
        "PARALLAMA_HOST": "127.0.0.1",  # the host's network: loopback only
        "PARALLAMA_PORT": str(port),
    }
    flags = [f"--env={k}={v}" for k, v in environment.items()]
    return podman("run", "--detach", "--network", "host", *flags, image)


def test_the_image_serves_as_a_user_and_drains_on_stop(image: str) -> None:
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    with sim_server(decode_tps=20.0, output_tokens=(40, 40)) as sim:
        began = time.monotonic()
        container = _started(image, sim.url, port)
        try:
            eventually(lambda: _answers(f"{url}/parallama/ready"), bool, 60)
            started_in = time.monotonic() - began
            answer = httpx.post(
                f"{url}/api/generate",
                json={"model": CHAT_MODEL, "prompt": "hi", "stream": False},
                timeout=60,
            )
            assert answer.status_code == 200
            assert answer.json()["done"] is True
            assert podman("exec", container, "id", "-u") == "10001"  # not root
            health = subprocess.run(["podman", "healthcheck", "run", container], check=False)
            assert health.returncode == 0  # the image's HEALTHCHECK: /parallama/live answers

            with httpx.stream(
                "POST", f"{url}/api/generate", json={"model": CHAT_MODEL, "prompt": "count"},
                timeout=60,
            ) as stream:  # fmt: skip
                lines = stream.iter_lines()
                first = orjson.loads(next(lines))
                stopping = subprocess.Popen(["podman", "stop", "--time", "30", container])
                rest = [orjson.loads(line) for line in lines if line]
            assert stopping.wait(60) == 0
            exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container)
        finally:
            podman("rm", "--force", container, check=False)
    assert first["done"] is False
    assert rest[-1]["done"] is True  # the stream ran to its end through the stop
    assert len(rest) == 40  # 39 more tokens and the final line
    assert exit_code == "0"
    print(f"image {image}: {_size_mb(image):.0f} MB, serving {started_in:.2f} s after run")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _size_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6
