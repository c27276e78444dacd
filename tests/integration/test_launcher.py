"""`parallama up`: engines started, put behind the gateway, restarted when they die, and all
stopped on Ctrl-C or SIGTERM. The emulator stands in for `ollama serve` through `command`, as
the `ollama` binary cannot be installed here; it reads the same OLLAMA_* variables."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import ollama
import pytest

from parallama.launch.engines import InstanceSettings, launch
from parallama.launch.supervisor import LaunchError, Supervisor
from tests.launchhelpers import alive, running_up, up_until_it_ends
from tests.simhelpers import CHAT_MODEL, state, wait_for_gateway

# The emulator as `ollama serve`, fast enough for tests.
FAKE_OLLAMA = [
    sys.executable,
    "-m",
    "parallama",
    "sim",
    "--decode-tps",
    "2000",
    "--load-seconds",
    "0",
]


def write_config(tmp_path: Path, instances: str, gateway: str = "health_interval = 0.2") -> Path:
    path = tmp_path / "up.toml"
    path.write_text(gateway + "\n" + instances)
    return path


def ollama_instance(name: str, **settings: str) -> str:
    lines = [
        "[[instances]]",
        'engine = "ollama"',
        f'name = "{name}"',
        "port = 0",
        f"command = {FAKE_OLLAMA!r}".replace("'", '"'),
    ]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def instances_of(url: str) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = httpx.get(f"{url}/parallama/status").json()["instances"]
    return listed


def test_up_starts_ollama_instances_with_their_settings_behind_the_gateway(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path,
        ollama_instance("gpu0", num_parallel="2", keep_alive='"-1"', gpus='"0"')
        + ollama_instance("gpu1", num_parallel="2", keep_alive='"-1"', gpus='"1"'),
    )
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        listed = instances_of(up.url)
        assert [(i["name"], i["state"], i["restarts"]) for i in listed] == [
            ("gpu0", "ready", 0),
            ("gpu1", "ready", 0),
        ]
        backends = httpx.get(f"{up.url}/parallama/status").json()["backends"]
        assert [b["slots"] for b in backends] == [2, 2]

        reply = ollama.Client(host=up.url).chat(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.message.content

        # The engine was told OLLAMA_NUM_PARALLEL=2 and OLLAMA_KEEP_ALIVE=-1 (keep forever).
        backends = httpx.get(f"{up.url}/parallama/status").json()["backends"]
        engine = str(next(b["url"] for b in backends if b["loaded"]))
        loaded = state(engine)["models"][0]
        assert (loaded["name"], loaded["slots"]) == (CHAT_MODEL, 2)
        ps = httpx.get(f"{engine}/api/ps").json()["models"][0]
        assert int(ps["expires_at"][:4]) > 2200  # Go's "forever": 292 years from now

        log = up.log.read_text()
        assert "instance=gpu0" in log and "emulated Ollama server" in log  # its output, named


def test_a_crashed_instance_is_restarted_and_serves_again(tmp_path: Path) -> None:
    config = write_config(tmp_path, ollama_instance("a") + ollama_instance("b"))
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        first = instances_of(up.url)[0]
        os.kill(int(str(first["pid"])), signal.SIGKILL)
        status = wait_for_gateway(
            up.url,
            lambda s: s["instances"][0]["restarts"] == 1 and s["instances"][0]["state"] == "ready",
            timeout=30,
        )
        again = status["instances"][0]
        assert again["pid"] != first["pid"]
        assert again["last_exit"] == -signal.SIGKILL
        assert alive(int(str(again["pid"])))
        # And the gateway sends it work again once its health check passes.
        wait_for_gateway(up.url, lambda s: all(b["healthy"] for b in s["backends"]), timeout=30)
        replies = [
            httpx.post(
                f"{up.url}/api/generate",
                json={"model": CHAT_MODEL, "prompt": "x", "stream": False},
                timeout=30,
            )
            for _ in range(4)
        ]
        assert all(r.status_code == 200 for r in replies)
        assert "instance exited" in up.log.read_text()
        metrics = httpx.get(f"{up.url}/metrics").text
        assert 'parallama_instance_restarts_total{instance="a"} 1.0' in metrics
        assert 'parallama_instance_up{instance="b"} 1.0' in metrics


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stopping_up_leaves_no_engine_behind(tmp_path: Path, stop_signal: int) -> None:
    config = write_config(tmp_path, ollama_instance("a") + ollama_instance("b"))
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        pids = [int(str(i["pid"])) for i in instances_of(up.url)]
        assert all(alive(pid) for pid in pids)
        up.process.send_signal(stop_signal)
        assert up.process.wait(30) == 0
    assert not any(alive(pid) for pid in pids)
    assert up.log.read_text().count("instance stopped") == 2


def test_an_engine_that_cannot_start_is_reported_and_the_others_stopped(tmp_path: Path) -> None:
    broken = [sys.executable, "-c", "print('no GPU found'); raise SystemExit(3)"]
    config = write_config(
        tmp_path,
        ollama_instance("good")
        + '[[instances]]\nname = "broken"\nport = 0\n'
        + f"command = {broken!r}\n".replace("'", '"').replace('"no GPU found"', "'no GPU found'"),
    )
    done = up_until_it_ends("--port", "0", "--config", str(config))
    assert done.returncode == 1
    assert "instance broken exited with code 3 before it served" in done.stderr
    assert "no GPU found" in done.stderr
    assert "instance stopped" in done.stderr  # the good one, stopped again


def test_a_missing_program_and_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    missing = write_config(
        tmp_path, '[[instances]]\nport = 0\ncommand = ["no-such-ollama-binary", "serve"]\n'
    )
    done = up_until_it_ends("--config", str(missing))
    assert done.returncode == 1
    assert "cannot run 'no-such-ollama-binary'" in done.stderr
    bad = write_config(tmp_path, '[[instances]]\nengine = "llama-cpp"\nport = 1\n')
    done = up_until_it_ends("--config", str(bad))
    assert done.returncode == 2
    assert "instances.0: a llama-cpp instance needs model" in done.stderr


def test_the_short_form_starts_n_alike_emulators(tmp_path: Path) -> None:
    with running_up(
        "--instances", "3", "--engine", "sim", "--base-port", "0", log=tmp_path / "up.log"
    ) as up:
        listed = instances_of(up.url)
        assert [i["name"] for i in listed] == ["sim-0", "sim-1", "sim-2"]
        assert len({i["url"] for i in listed}) == 3
        tags = ollama.Client(host=up.url).list()
        assert CHAT_MODEL in {m.model for m in tags.models}


def test_an_engine_still_being_started_when_another_fails_is_stopped_too() -> None:
    """A mistyped command must not leave the other engines running, unseen, in their own
    sessions: one of them may not even have its process yet when the other fails."""
    good = launch(InstanceSettings(engine="command", command=["sleep", "37"], port=1), 0, 1)
    bad = launch(InstanceSettings(engine="command", command=["/nonexistent"], port=2), 1, 2)
    supervisor = Supervisor([good, bad])

    async def scenario() -> None:
        with pytest.raises(LaunchError, match="cannot run '/nonexistent'"):
            await supervisor.start()

    asyncio.run(scenario())
    sleeper = supervisor.instances[0].process
    assert sleeper is not None
    assert not alive(sleeper.pid)
