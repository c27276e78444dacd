"""The real coding agents, Claude Code and Codex, installed from the npm registry and run
headless against a gateway on loopback, as a team would point them at its fleet.

Installed once into parallama's cache folder (npm's own cache makes a new install quick), pinned
to the versions below. Each run gets a clean environment (nothing of the caller's, no key of
its), a fresh home and config folder, and the settings that keep it offline: Claude Code's
`CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`, Codex's analytics and plugins off; and a proxy
that refuses everything, on a loopback port nobody listens on, for any request to another host
that either would still make. Skipped without npm, unless PARALLAMA_REQUIRE_AGENTS=1 (as
`.ci/run` sets it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import pytest

from parallama.launch.supervisor import free_port

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.332"
CODEX = "@openai/codex@0.171.0"
REQUIRED = os.environ.get("PARALLAMA_REQUIRE_AGENTS") == "1"
CODEX_CONFIG = """\
check_for_update_on_startup = false
[analytics]
enabled = false
[feedback]
enabled = false
[otel]
exporter = "none"
metrics_exporter = "none"
[features]
plugins = false
remote_plugin = false
apps = false
in_app_updates = false
"""


@dataclass(frozen=True)
class Ran:
    status: int
    stdout: str
    stderr: str


def agents_folder() -> Path:
    """Where both agents are installed (once; `npm install` again when the pins change)."""
    versions = f"{CLAUDE_CODE}+{CODEX}".replace("/", "_").replace("@", "")
    folder = Path(platformdirs.user_cache_dir("parallama")) / "agents" / versions
    if (folder / "node_modules" / ".bin" / "codex").exists():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        if REQUIRED:
            pytest.fail("npm is needed for the coding agents' tests (Debian: apt-get install npm)")
        pytest.skip("npm is not installed: the coding agents cannot be")
    folder.mkdir(parents=True, exist_ok=True)
    install = [
        npm,
        "install",
        "--prefix",
        str(folder),
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]
    done = subprocess.run(
        [*install, CLAUDE_CODE, CODEX], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"npm install of the coding agents failed: {done.stderr[-2000:]}")
    return folder


def _environment(home: Path, **settings: str) -> dict[str, str]:
    refusing = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nobody listens: refused at once
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TERM": "dumb",
        "HTTPS_PROXY": refusing,
        "HTTP_PROXY": refusing,
        "NO_PROXY": "127.0.0.1,localhost",
        **settings,
    }


def run_claude(folder: Path, home: Path, gateway: str, prompt: str, model: str) -> Ran:
    """`claude -p PROMPT --model MODEL` with the gateway as its Anthropic API."""
    env = _environment(
        home,
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        ANTHROPIC_BASE_URL=gateway,
        ANTHROPIC_AUTH_TOKEN="ollama",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
    )
    claude = folder / "node_modules" / ".bin" / "claude"
    return _run([str(claude), "-p", prompt, "--model", model], env, home)


def run_codex(folder: Path, home: Path, gateway: str, prompt: str, model: str) -> Ran:
    """`codex exec --oss --local-provider ollama -m MODEL PROMPT` with the gateway as its
    Ollama (`CODEX_OSS_BASE_URL`)."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG)
    env = _environment(home, CODEX_HOME=str(codex_home), CODEX_OSS_BASE_URL=f"{gateway}/v1")
    codex = folder / "node_modules" / ".bin" / "codex"
    argv = [str(codex), "exec", "--oss", "--local-provider", "ollama", "-m", model]
    argv += ["--skip-git-repo-check", "-c", "analytics.enabled=false", "--disable", "plugins"]
    return _run([*argv, prompt], env, home)


def _run(argv: list[str], env: dict[str, str], home: Path) -> Ran:
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        argv,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)
