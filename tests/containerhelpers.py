"""Podman for the tests of the container image and the compose stack: the image built from the
checkout on a Debian base made here (no image registry is reachable from the machines the
suite runs on), with Debian's `runc` and without the default ulimits (a containers.conf of the
tests' own): podman's default `crun` fails in these VMs.

Needs podman, runc and debootstrap (root, for debootstrap); `MISSING` says which is not there.
The tests skip with it, except where PARALLAMA_REQUIRE_CONTAINERS=1 (`.ci/run` sets it; the
test command installs them) turns the skip into a failure with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import pytest

from tests.docs import ROOT

BASE = "localhost/parallama-base:bookworm"
IMAGE = "localhost/parallama:test"
CACHE = Path(platformdirs.user_cache_dir("parallama"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def tool(name: str) -> str | None:
    """A program on PATH, or in /usr/sbin (not on a user's PATH on Debian)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


def _missing() -> str:
    for name in ("podman", "runc", "debootstrap"):
        if tool(name) is None:
            return f"the container tests need {name}: apt-get install podman runc debootstrap"
    if os.geteuid() != 0 and not (CACHE / "container-base" / "bookworm.tar").exists():
        return "the container tests build their base image with debootstrap, which needs root"
    return ""


MISSING = _missing()
if MISSING and os.environ.get("PARALLAMA_REQUIRE_CONTAINERS") == "1":
    raise RuntimeError(MISSING)
needs_podman = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def podman(*args: str, check: bool = True, timeout: float = 600) -> str:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip()


@contextlib.contextmanager
def podman_settings() -> Iterator[None]:
    """CONTAINERS_CONF pointing at the tests' own settings, for this block (and podman's
    children: podman-compose runs podman)."""
    settings = Path(tempfile.mkdtemp(prefix="parallama-podman-")) / "containers.conf"
    settings.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    before = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(settings)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = before
        shutil.rmtree(settings.parent, ignore_errors=True)


def build(tag: str, containerfile: Path, context: Path) -> str:
    """An image built on the local base (made once, then cached); its tag."""
    if not _exists(BASE):
        _import_base()
    flags = ["--network", "host", "--format", "docker", "--build-arg", f"BASE={BASE}"]
    if HOST_CA.exists():  # a proxy that re-signs TLS, as on the suite's machines
        flags += ["-v", f"{HOST_CA}:/run/host-ca.crt:ro"]
        flags += ["--build-arg", "PIP_CERT=/run/host-ca.crt"]
    podman("build", *flags, "-t", tag, "-f", str(containerfile), str(context))
    return tag


def build_parallama() -> str:
    """The gateway's image, from the checkout's Containerfile."""
    return build(IMAGE, ROOT / "Containerfile", ROOT)


def build_once(name: str, folder: Path) -> str:
    """An image of a folder's Containerfile, tagged by a hash of the folder: built when that
    tag is not there yet."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"localhost/{name}:{digest.hexdigest()[:12]}"
    if not _exists(tag):
        build(tag, folder / "Containerfile", folder)
    return tag


def _exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0


def _import_base() -> None:
    """Debian bookworm with Python, by debootstrap, kept as a tarball for the next run."""
    tarball = CACHE / "container-base" / "bookworm.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="parallama-rootfs-") as rootfs:
            subprocess.run(
                [tool("debootstrap") or "debootstrap", "--variant=minbase",
                 "--include=python3,python3-venv,ca-certificates", "bookworm", rootfs,
                 "http://deb.debian.org/debian"],
                check=True, capture_output=True, timeout=1200,
            )  # fmt: skip
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", rootfs, "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
    podman("import", str(tarball), BASE)
