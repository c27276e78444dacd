"""The llama-server these tests run must run on CPUs other than the one that built it.

llama.cpp builds for the building CPU by default (`-march=native`): a binary built on a machine
with AVX-512 or AMX then dies with SIGILL elsewhere, and AMX builds crash on Sapphire Rapids.
parallama builds it portable (`GGML_NATIVE=OFF`: AVX2, FMA, F16C; `launch.llama_build`). This
test runs that llama-server under QEMU's user-mode emulation as a Haswell CPU (AVX2, no AVX-512,
no AMX) and checks it answers exactly as it does on this machine's own CPU.

Needs `qemu-x86_64` (Debian's qemu-user) on an x86-64 machine; skipped without it, except where
PARALLAMA_REQUIRE_QEMU=1 (`.ci/run` installs qemu-user and sets it) turns the skip into a failure.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from parallama.launch.llama_build import built_server, smollm2_path
from parallama.launch.supervisor import free_port
from tests.e2e.test_real_llama import MISSING

QEMU = shutil.which("qemu-x86_64")
X86 = platform.machine() == "x86_64"
if X86 and not QEMU and os.environ.get("PARALLAMA_REQUIRE_QEMU") == "1":
    raise RuntimeError("the portable-build test needs qemu-x86_64: apt-get install qemu-user")
NO_QEMU = "needs qemu-x86_64 on x86-64 (apt-get install qemu-user)"
# The build parallama makes, not one the user has on PATH (which the other tests would run).
OURS = "" if built_server().exists() else "llama-server not built here (parallama llama-server)"
pytestmark = pytest.mark.skipif(
    bool(MISSING or OURS) or not (X86 and QEMU), reason=MISSING or OURS or NO_QEMU
)

# A raw prompt of five tokens and six more generated: every token costs seconds under QEMU.
PROMPT = {"prompt": "The sky is blue because", "n_predict": 6, "temperature": 0, "seed": 1}


def answer(log: Path, *emulator: str) -> str:
    """SmolLM2's greedy answer from llama-server, run directly or under `emulator`."""
    server, model = built_server(), smollm2_path()
    assert model is not None
    port = free_port("127.0.0.1")
    argv = [*emulator, str(server), "--model", str(model), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--ctx-size", "64", "--threads", "1", "--parallel", "1"]
    argv += ["--no-warmup", "--no-webui"]
    with open(log, "wb") as out:
        engine = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 400
        while not ready(url):
            exited = engine.poll()
            assert exited is None, f"exit {exited}:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, "llama-server did not load the model in time"
            time.sleep(0.5)  # llama-server says it is ready only by answering /health
        reply = httpx.post(f"{url}/completion", json=PROMPT, timeout=400)
        assert reply.status_code == 200, reply.text
        content: str = reply.json()["content"]
        return content
    finally:
        engine.terminate()
        engine.wait(30)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(900)
def test_the_llama_server_build_answers_alike_on_an_older_cpu(tmp_path: Path) -> None:
    here = answer(tmp_path / "native.log")
    on_haswell = answer(tmp_path / "haswell.log", QEMU or "qemu-x86_64", "-cpu", "Haswell")
    assert here.strip()  # a real answer, not an empty one
    assert on_haswell == here
