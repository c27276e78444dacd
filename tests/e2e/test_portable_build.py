"""The llama.cpp these tests run must run on CPUs other than the one that built it.

llama.cpp builds for the building CPU by default (`-march=native`): a wheel built on a machine
with AVX-512 or AMX then dies with SIGILL elsewhere, and AMX builds crash on Sapphire Rapids.
The README's install builds it portable (`CMAKE_ARGS=-DGGML_NATIVE=OFF`: AVX2, FMA, F16C). This
test runs the installed build under QEMU's user-mode emulation as a Haswell CPU (AVX2, no
AVX-512, no AMX) and checks it answers exactly as it does on this machine's own CPU.

Needs `qemu-x86_64` (Debian's qemu-user) on an x86-64 machine; skipped without it, except where
PARALLAMA_REQUIRE_QEMU=1 (`.ci/run` installs qemu-user and sets it) turns the skip into a failure.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_real_llama import MISSING

QEMU = shutil.which("qemu-x86_64")
X86 = platform.machine() == "x86_64"
if X86 and not QEMU and os.environ.get("PARALLAMA_REQUIRE_QEMU") == "1":
    raise RuntimeError("the portable-build test needs qemu-x86_64: apt-get install qemu-user")
NO_QEMU = "needs qemu-x86_64 on x86-64 (apt-get install qemu-user)"
pytestmark = pytest.mark.skipif(bool(MISSING) or not (X86 and QEMU), reason=MISSING or NO_QEMU)

# A raw prompt of five tokens and six more generated: every token costs seconds under QEMU (the
# chat template's system prompt alone took over two minutes on a Sapphire Rapids host).
GENERATE = """
from llama_cpp import Llama
from parallama.launch.engines import smollm2_path
llm = Llama(model_path=str(smollm2_path()), n_ctx=64, n_threads=1, verbose=False)
answer = llm("The sky is blue because", max_tokens=6, temperature=0)
print(answer["choices"][0]["text"])
"""


def answer(*emulator: str) -> str:
    """SmolLM2's greedy answer, from this Python run directly or under `emulator`."""
    python = os.path.realpath(sys.executable)  # the emulator runs the interpreter itself
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [*emulator, python, "-c", GENERATE],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout.strip()


@pytest.mark.timeout(600)
def test_the_llama_cpp_build_answers_alike_on_an_older_cpu() -> None:
    assert QEMU is not None
    here = answer()
    on_haswell = answer(QEMU, "-cpu", "Haswell")
    assert here  # a real answer, not an empty one
    assert on_haswell == here
