"""The container image (`Containerfile`) built and run with podman, as a team would run it: it
serves through the real gateway inside, as a user that is not root, its HEALTHCHECK passes, and
`podman stop` (SIGTERM) lets a stream in flight finish before the container exits 0.

No image registry is reachable from the machines the suite runs on, so the image is built on a
Debian made here with debootstrap (cached in ~/.cache/parallama as a tarball) instead of the
official Python image the Containerfile defaults to. Podman runs with Debian's `runc` and without
the default ulimits (a containers.conf of the test's own): its default `crun` fails in these VMs.
The container shares the host's network, so that every request stays on loopback.

Needs podman, runc and debootstrap (root, for debootstrap); skipped without them, except where
PARALLAMA_REQUIRE_CONTAINERS=1 (`.ci/run` sets it; the test command installs them) turns the
skip into a failure with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from parallama.launch.supervisor import free_port
from tests.docs import ROOT
from tests.simhelpers import CHAT_MODEL, eventually, sim_server

BASE = "localhost/parallama-base:bookworm"
IMAGE = "localhost/parallama:test"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parallama"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def _tool(name: str) -> str | None:
    """A program on PATH, or in /usr/sbin (not on a user's PATH on Debian)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


def _missing() -> str:
    for tool in ("podman", "runc", "debootstrap"):
        if _tool(tool) is None:
            return f"the container test needs {tool}: apt-get install podman runc debootstrap"
    if os.geteuid() != 0 and not (CACHE / "container-base" / "bookworm.tar").exists():
        return "the container test builds its base image with debootstrap, which needs root"
    return ""


MISSING = _missing()
if MISSING and os.environ.get("PARALLAMA_REQUIRE_CONTAINERS") == "1":
    raise RuntimeError(MISSING)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def podman(*args: str, check: bool = True, timeout: float = 600) -> str:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip()


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image, built from the checkout on the local base (made once, then cached)."""
    settings = Path(tempfile.mkdtemp(prefix="parallama-podman-")) / "containers.conf"
    settings.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    before = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(settings)
    try:
        if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode != 0:
            _import_base()
        build = ["build", "--network", "host", "--format", "docker", "--build-arg", f"BASE={BASE}"]
        if HOST_CA.exists():  # a proxy that re-signs TLS, as on the suite's machines
            build += [
                "-v",
                f"{HOST_CA}:/run/host-ca.crt:ro",
                "--build-arg",
                "PIP_CERT=/run/host-ca.crt",
            ]
        podman(*build, "-t", IMAGE, "-f", str(ROOT / "Containerfile"), str(ROOT))
        yield IMAGE
    finally:
        if before is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = before
        shutil.rmtree(settings.parent, ignore_errors=True)


def _import_base() -> None:
    """Debian bookworm with Python, by debootstrap, kept as a tarball for the next run."""
    tarball = CACHE / "container-base" / "bookworm.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="parallama-rootfs-") as rootfs:
            subprocess.run(
                [_tool("debootstrap") or "debootstrap", "--variant=minbase",
                 "--include=python3,python3-venv,ca-certificates", "bookworm", rootfs,
                 "http://deb.debian.org/debian"],
                check=True, capture_output=True, timeout=1200,
            )  # fmt: skip
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", rootfs, "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
    podman("import", str(tarball), BASE)


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
