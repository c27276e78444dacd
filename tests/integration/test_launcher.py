"""`parallama up`: engines started, put behind the gateway, restarted when they die, and all
stopped on Ctrl-C or SIGTERM. The emulator stands in for `ollama serve` through `command`, as
the `ollama` binary cannot be installed here; it reads the same OLLAMA_* variables."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import ollama
import pytest

from parallama.launch import ports
from parallama.launch.engines import InstanceSettings, launch
from parallama.launch.output import EngineOutput
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


def ollama_instance(name: str, port: int = 0, **settings: str) -> str:
    lines = [
        "[[instances]]",
        'engine = "ollama"',
        f'name = "{name}"',
        f"port = {port}",
        f"command = {FAKE_OLLAMA!r}".replace("'", '"'),
    ]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Stranger:
    """A web server that is not an engine, and what it was asked."""

    port: int
    asked: list[str] = field(default_factory=list)


@contextmanager
def stranger_on(port: int = 0) -> Iterator[Stranger]:
    """Any server a user may already run on a port: 200 and `{}` to every request."""
    stranger = Stranger(port)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            stranger.asked.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    stranger.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield stranger
    finally:
        server.shutdown()
        server.server_close()


def killed(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL process `pid` (not a child of ours) and return once it has ended: its pidfd,
    taken before the signal, becomes readable."""
    descriptor = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(descriptor, signal.SIGKILL)
        readable, _, _ = select.select([descriptor], [], [], timeout)
        assert readable, f"process {pid} still runs after {timeout} s"
    finally:
        os.close(descriptor)


def generations(url: str, count: int) -> list[int]:
    """The status codes of `count` generations, one after the other."""
    body = {"model": CHAT_MODEL, "prompt": "x", "stream": False}
    return [
        httpx.post(f"{url}/api/generate", json=body, timeout=30).status_code for _ in range(count)
    ]


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

        # Each engine's output is in its own file, shown at start and in the status; the
        # console says only what happened to it.
        for name, listed_instance in zip(("gpu0", "gpu1"), listed, strict=True):
            engine_log = up.log_dir / f"{name}.log"
            assert listed_instance["log"] == str(engine_log)
            assert f"instance {name}  pid {listed_instance['pid']}" in "\n".join(up.output)
            assert f"log {engine_log}" in "\n".join(up.output)
            assert "emulated Ollama server" in engine_log.read_text()
        console = up.log.read_text()
        assert "emulated Ollama server" not in console
        assert 'event="instance ready" instance=gpu0' in console


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
        assert generations(up.url, 4) == [200] * 4
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
    done = up_until_it_ends("--port", "0", "--config", str(config), log_dir=tmp_path)
    assert done.returncode == 1
    assert "instance broken exited with code 3 before it served" in done.stderr
    assert "no GPU found" in done.stderr
    assert "instance stopped" in done.stderr  # the good one, stopped again


def test_a_missing_program_and_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    missing = write_config(
        tmp_path, '[[instances]]\nport = 0\ncommand = ["no-such-ollama-binary", "serve"]\n'
    )
    done = up_until_it_ends("--config", str(missing), log_dir=tmp_path)
    assert done.returncode == 1
    assert "cannot run 'no-such-ollama-binary'" in done.stderr
    bad = write_config(tmp_path, '[[instances]]\nengine = "llama-server"\nport = 1\n')
    done = up_until_it_ends("--config", str(bad), log_dir=tmp_path)
    assert done.returncode == 2
    assert "instances.0: a llama-server instance needs model" in done.stderr


def test_the_short_form_starts_n_alike_emulators(tmp_path: Path) -> None:
    with running_up(
        "--instances", "3", "--engine", "sim", "--base-port", "0", log=tmp_path / "up.log"
    ) as up:
        listed = instances_of(up.url)
        assert [i["name"] for i in listed] == ["sim-0", "sim-1", "sim-2"]
        assert len({i["url"] for i in listed}) == 3
        tags = ollama.Client(host=up.url).list()
        assert CHAT_MODEL in {m.model for m in tags.models}


def test_the_engines_output_is_in_parallamas_log_at_debug_level(tmp_path: Path) -> None:
    with running_up(
        "--instances",
        "1",
        "--engine",
        "sim",
        "--base-port",
        "0",
        "--log-level",
        "debug",
        log=tmp_path / "up.log",
    ) as up:
        wait_for_gateway(up.url, lambda s: s["instances"][0]["state"] == "ready")
    console = up.log.read_text()
    assert 'level=debug logger=parallama.engine event="parallama sim: 1 emulated' in console
    assert "instance=sim-0" in console


def test_an_engines_log_file_is_appended_to_and_bounded(tmp_path: Path) -> None:
    """Across runs and restarts the file grows, up to its bound: then it becomes `.1` (the
    one before is dropped) and a new file begins."""
    path = tmp_path / "logs" / "gpu0.log"
    output = EngineOutput("gpu0", path, max_bytes=4000)

    async def run(number: int) -> None:  # about 1,200 bytes of output
        output.open()
        printing = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"for i in range(20): print('run {number} line', i, 'x' * 40)",
            stdout=asyncio.subprocess.PIPE,
        )
        assert printing.stdout is not None
        output.begin(printing.pid)
        await output.read(printing.stdout)
        output.end(f"code {await printing.wait()}")

    async def runs(numbers: range) -> None:
        for number in numbers:
            await run(number)
        output.close()

    asyncio.run(runs(range(2)))
    text = path.read_text()
    assert text.count("run 0 line") == text.count("run 1 line") == 20
    assert text.count("--- parallama: gpu0 started, pid") == text.count("gpu0 ended: code 0") == 2
    assert list(output.last)[-1] == "run 1 line 19 " + "x" * 40

    asyncio.run(runs(range(2, 10)))  # 12,000 bytes in all: rotated twice
    rotated = path.with_name("gpu0.log.1")
    assert path.stat().st_size <= 4000 and rotated.stat().st_size <= 4000
    assert "run 9 line 19" in path.read_text()
    assert "run 0 line" not in rotated.read_text() + path.read_text()  # the oldest dropped


def test_the_holder_of_a_port_is_found_by_its_socket() -> None:
    """What names the stranger in the error: this test's own sockets, IPv4 and IPv6."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as listening:
            listening.bind((host, 0))
            listening.listen()
            port = listening.getsockname()[1]
            assert ports.in_use(host, port)
            holder = ports.holder(host, port)
            assert holder.startswith(f"pid {os.getpid()} (") and "pytest" in holder
            assert ports.held_by_session(host, port, os.getsid(0)) is True
            assert ports.held_by_session(host, port, os.getsid(0) + 1) is False
        assert not ports.in_use(host, port)


def test_without_proc_the_holder_is_unknown_rather_than_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ports, "PROC", tmp_path)  # a system without /proc
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert ports.holder("127.0.0.1", port) == "a process this user cannot see"
        assert ports.held_by_session("127.0.0.1", port, os.getsid(0)) is None


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


def test_up_refuses_a_port_another_server_already_answers_on(tmp_path: Path) -> None:
    """Not "some server answers 200 there, so the engine is ready": the engine could not even
    listen, and the gateway would send every request to a stranger."""
    with stranger_on() as stranger:
        config = write_config(tmp_path, ollama_instance("gpu0", port=stranger.port))
        done = up_until_it_ends("--config", str(config), log_dir=tmp_path)
    assert done.returncode == 1
    assert f"instance gpu0: port {stranger.port} on 127.0.0.1 is in use" in done.stderr
    assert f"pid {os.getpid()}" in done.stderr  # this test's process holds it
    assert not [asked for asked in stranger.asked if asked.startswith("POST")]


def test_while_an_instance_restarts_nothing_is_sent_to_a_stranger_on_its_port(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, ollama_instance("a") + ollama_instance("b"))
    with running_up("--config", str(config), log=tmp_path / "up.log") as up:
        victim = instances_of(up.url)[0]
        port = int(str(victim["url"]).rsplit(":", 1)[1])
        killed(int(str(victim["pid"])))
        with stranger_on(port) as stranger:  # before the restart, a second later
            status = wait_for_gateway(
                up.url,
                lambda s: (
                    s["instances"][0]["restarts"] >= 1
                    and (s["instances"][0]["state"] == "ready" or s["instances"][0]["last_error"])
                ),
                timeout=30,
            )
            restarting = status["instances"][0]
            assert restarting["state"] == "restarting"
            assert f"port {port} on 127.0.0.1 is in use" in restarting["last_error"]
            assert f"pid {os.getpid()}" in restarting["last_error"]
            assert generations(up.url, 4) == [200] * 4  # all from b
            # Not even probed: what answers there is not taken for the engine.
            assert stranger.asked == []
        assert "restart failed" in up.log.read_text()
