"""`parallama sim` as a user runs it: a real process, real ports, Ctrl-C to stop."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from parallama.cli import build_parser
from tests.launchhelpers import finished, sim_process
from tests.simhelpers import wait_for_gateway


def test_several_servers_in_one_process_stop_cleanly_on_ctrl_c() -> None:
    with sim_process("--port", "0", "--port", "0", "--profile", "fast") as (process, urls):
        assert len(urls) == 2
        assert len(set(urls)) == 2
        for url in urls:
            assert httpx.get(url).text == "Ollama is running"
        # Each is its own Ollama: loading a model on one leaves the other empty.
        httpx.post(f"{urls[0]}/api/generate", json={"model": "qwen2.5:7b"}, timeout=10)
        assert [m["name"] for m in httpx.get(f"{urls[0]}/api/ps").json()["models"]] == [
            "qwen2.5:7b"
        ]
        assert httpx.get(f"{urls[1]}/api/ps").json()["models"] == []
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


def test_serve_puts_a_gateway_in_front_of_emulated_servers() -> None:
    with sim_process("--port", "0", "--port", "0", "--profile", "fast") as (sim, backends):
        args = [arg for url in backends for arg in ("--backend", url)]
        with sim_process(*args, "--port", "0", command="serve") as (gateway, urls):
            url = urls[0]
            body = {"model": "qwen2.5:7b", "prompt": "hi", "stream": False}
            assert httpx.post(f"{url}/api/generate", json=body, timeout=10).json()["done"] is True
            assert httpx.get(f"{url}/parallama/status").json()["completed"] == 1
            gateway.send_signal(signal.SIGINT)
            assert gateway.wait(timeout=10) == 0
        sim.terminate()
        sim.wait(timeout=10)


def test_serve_reads_a_config_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    with sim_process("--port", "0", "--profile", "fast") as (sim, backends):
        good = tmp_path / "parallama.toml"
        good.write_text(
            f'port = 0\nmax_queue = 7\n[[backends]]\nurl = "{backends[0]}"\nslots = 3\n'
        )
        with sim_process("--config", str(good), command="serve") as (gateway, urls):
            status = httpx.get(f"{urls[0]}/parallama/status").json()
            assert [(b["url"], b["slots"]) for b in status["backends"]] == [(backends[0], 3)]
            # SIGHUP reads the file again; the address stays what it was.
            good.write_text(good.read_text().replace("slots = 3", "slots = 5"))
            gateway.send_signal(signal.SIGHUP)
            wait_for_gateway(urls[0], lambda s: s["backends"][0]["slots"] == 5)
            gateway.terminate()
            assert gateway.wait(timeout=10) == 0
        sim.terminate()
        sim.wait(timeout=10)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[backends]]\nurl = "http://127.0.0.1:1"\nslot = 2\n')
    result = subprocess.run(
        [sys.executable, "-m", "parallama", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "backends.0.slot: unknown setting" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_and_the_examples_it_prints_work() -> None:
    printed: list[str] = []
    with sim_process("--port", "0", "--profile", "fast", command="demo", printed=printed) as (
        demo,
        urls,
    ):
        gateway = urls[0]
        curl = next(line.strip() for line in printed if line.strip().startswith("curl "))
        _, _, url, _, body = shlex.split(curl)
        assert url == f"{gateway}/api/chat"
        reply = httpx.post(url, content=body, timeout=10)
        assert reply.status_code == 200
        assert reply.json()["message"]["content"]
        start = printed.index("or from Python (pip install ollama):") + 1
        snippet = "\n".join(line.strip() for line in printed[start:] if line.startswith("  "))
        ran = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=30, check=True
        )
        assert ran.stdout.strip()
        status = httpx.get(f"{gateway}/parallama/status").json()
        assert status["completed"] == 2
        assert len(status["backends"]) == 2
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=10) == 0


def test_ollama_environment_variables_configure_it() -> None:
    env = {"OLLAMA_NUM_PARALLEL": "3", "OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_HOST": "127.0.0.1:0"}
    with sim_process("--profile", "fast", env=env) as (process, urls):
        url = urls[0]
        httpx.post(f"{url}/api/generate", json={"model": "qwen2.5:7b"}, timeout=10)
        slots = httpx.get(f"{url}/_sim/state").json()["models"][0]["slots"]
        assert slots == 3
        expires = httpx.get(f"{url}/api/ps").json()["models"][0]["expires_at"]
        assert int(expires[:4]) > 2200  # kept forever
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_a_profile_file_sets_the_emulators_speeds(tmp_path: Path) -> None:
    profile = tmp_path / "measured.toml"
    profile.write_text("prefill_tps = 1000\ndecode_tps = 40\nbatch_curve = [1.0, 1.5]\n")
    with sim_process("--port", "0", "--profile", str(profile), "--num-parallel", "2") as (
        process,
        urls,
    ):
        body = {
            "model": "qwen2.5:7b",
            "prompt": "hi",
            "stream": False,
            "options": {"num_predict": 8},
        }
        answer = httpx.post(f"{urls[0]}/api/generate", json=body, timeout=30).json()
        process.terminate()
        assert process.wait(timeout=10) == 0
    assert answer["eval_count"] == 8
    assert answer["eval_duration"] / 1e9 == pytest.approx(8 / 40, rel=0.3)  # 40 tokens/s


def cached_on_the_first_conversations_next_turn(url: str) -> int:
    """Two slots; conversation A, then B (the same system prompt), then A's next turn: the
    prompt tokens that next turn found cached."""
    system = {"role": "system", "content": "You answer in the house style. " * 40}

    def ask(messages: list[dict[str, str]]) -> dict[str, str]:
        body = {"model": "qwen2.5:7b", "messages": messages, "stream": False}
        answer: dict[str, dict[str, str]] = httpx.post(f"{url}/api/chat", json=body).json()
        return answer["message"]

    def cached() -> int:
        counted: dict[str, dict[str, int]] = httpx.get(f"{url}/_sim/state").json()
        return counted["cached_tokens"]["qwen2.5:7b"]

    a = [system, {"role": "user", "content": "Why is the sky blue?"}]
    a.append(ask(a))
    ask([system, {"role": "user", "content": "What is a prime number?"}])
    before = cached()
    ask([*a, {"role": "user", "content": "And at sunset?"}])
    return cached() - before


@pytest.mark.parametrize(
    ("args", "keeps_the_conversation"),
    [
        ((), False),
        (("--prompt-cache", "ollama-legacy"), False),
        (("--prompt-cache", "ollama-legacy-multiuser"), True),
    ],
)
def test_the_prompt_cache_follows_the_rules_of_ollamas_engines(
    args: tuple[str, ...], keeps_the_conversation: bool
) -> None:
    # Ollama's llama.cpp server (the default) and its older runners both give B's turn the
    # slot that shares its system prompt, overwriting A's conversation there: A's next turn
    # finds only the system prompt (llama.cpp saves a slot to RAM only when it keeps less than
    # half of it). With OLLAMA_MULTIUSER_CACHE=1, the older runners give B the least recently
    # used slot, the system prompt copied in, and A's slot stays A's.
    with sim_process("--port", "0", "--num-parallel", "2", "--profile", "fast", *args) as (
        process,
        urls,
    ):
        cached = cached_on_the_first_conversations_next_turn(urls[0])
        process.terminate()
        assert process.wait(timeout=10) == 0
    system_prompt_tokens = 40 * 7  # "You answer in the house style. " is 7 of the emulator's
    if keeps_the_conversation:
        assert cached > system_prompt_tokens + 50  # the first question and its answer too
    else:
        assert system_prompt_tokens <= cached <= system_prompt_tokens + 10


def test_flags_override_the_environment() -> None:
    env = {"OLLAMA_NUM_PARALLEL": "3"}
    with sim_process("--port", "0", "--num-parallel", "2", "--profile", "fast", env=env) as (
        process,
        urls,
    ):
        httpx.post(f"{urls[0]}/api/generate", json={"model": "qwen2.5:7b"}, timeout=10)
        assert httpx.get(f"{urls[0]}/_sim/state").json()["models"][0]["slots"] == 2
        process.terminate()
        process.wait(timeout=10)


def test_help_documents_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "parallama", "sim", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    parser = build_parser()
    sim = next(
        choice
        for action in parser._subparsers._group_actions  # type: ignore[union-attr]
        for name, choice in action.choices.items()  # type: ignore[union-attr]
        if name == "sim"
    )
    for action in sim._actions:
        for flag in action.option_strings:
            assert flag in result.stdout
        if action.option_strings and action.help:
            assert action.help.split()[0] in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "out of range"),
        (["--port", "11436-11434"], "backwards"),
        (["--keep-alive", "soon"], "invalid duration"),
        (["--output-tokens", "9-3"], "MIN <= MAX"),
        (["--num-parallel", "0"], "must be positive"),
        (["--profile", "h100"], "or a profile file (.toml)"),
        (["--profile", "/nonexistent.toml"], "cannot read /nonexistent.toml"),
    ],
)
def test_bad_settings_are_refused_clearly(args: list[str], message: str) -> None:
    result = finished("sim", *args, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with sim_process("--port", "0", "--profile", "fast") as (process, urls):
        port = urls[0].rsplit(":", 1)[1]
        result = subprocess.run(
            [sys.executable, "-m", "parallama", "sim", "--port", port],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1
        assert "address already in use" in result.stderr.lower()
        assert "Traceback" not in result.stderr
        process.terminate()
        process.wait(timeout=10)
