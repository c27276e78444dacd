"""A real `redis-server` for tests: on a free loopback port, in a temporary directory, nothing
saved; stopped by its process id."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from parallama.launch.supervisor import free_port


@dataclass
class RedisServer:
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:  # no event says "listening": ask until it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """As a crash: SIGKILL; it comes back empty (nothing is saved)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    folder = Path(tempfile.mkdtemp(prefix="parallama-redis-"))
    server = RedisServer(free_port("127.0.0.1"), folder, password=password)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.terminate()
            server.process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
