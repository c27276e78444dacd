"""What the gateway costs, measured in one run against the same upstreams: direct, through
parallama, and through nginx (a plain, well-configured reverse proxy: upstream keep-alive,
buffering off).

1. Added latency and throughput against a trivial fixed-response upstream (an nginx `return 200`
   with an Ollama-shaped answer), loaded by wrk: p50 at concurrency 1, requests/s at 32.
2. Streaming fidelity: 200 concurrent streams at 50 tokens/s each from `parallama sim`; the
   per-stream decode rate each client sees, through each path.

The proxies run pinned to CPU 0, one process / one worker each; wrk, the upstreams and the
stream clients share CPU 1. Targets (issue 3): added p50 < 0.5 ms, >= 3,000 req/s at c=32, and
per-stream tokens/s through the gateway >= 97 % of direct. The machine is shared and noisy:
compare the ratios, which are measured side by side, rather than absolute figures.

    python benchmarks/gateway_overhead.py [--seconds 10] [--streams 200] [--rate 50]

Needs nginx and wrk on PATH (Debian: apt-get install nginx-light wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

PROXY_CPU, LOAD_CPU = "0", "1"
ANSWER = orjson.dumps(
    {
        "model": "qwen2.5:7b",
        "created_at": "2026-01-01T00:00:00Z",
        "response": "The sky is blue because of Rayleigh scattering.",
        "done": True,
        "done_reason": "stop",
        "total_duration": 1000000,
        "prompt_eval_count": 8,
        "eval_count": 10,
        "eval_duration": 900000,
    }
).decode()
REQUEST = orjson.dumps({"model": "qwen2.5:7b", "prompt": "Why is the sky blue?", "stream": False})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


@contextlib.contextmanager
def running(argv: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def nginx(server_block: str, port: int, cpu: str) -> Iterator[None]:
    """An nginx with one worker, in a scratch prefix directory, logging nothing."""
    with tempfile.TemporaryDirectory(prefix="parallama-bench-nginx-") as prefix:
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    {server_block}
}}
"""
        )
        argv = ["nginx", "-p", prefix, "-c", str(conf), "-g", "daemon off; user root;"]
        with running(pinned(cpu, argv), port):
            yield


def fixed_upstream(port: int) -> str:
    return f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{ANSWER}';
        }}
    }}"""


def reverse_proxy(port: int, upstream_port: int) -> str:
    return f"""
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}"""


def parallama(port: int, upstream_port: int, slots: int) -> list[str]:
    argv = [sys.executable, "-m", "parallama", "serve", "--port", str(port)]
    argv += ["--backend", f"http://127.0.0.1:{upstream_port}", "--slots", str(slots)]
    return pinned(PROXY_CPU, [*argv, "--no-log-requests", "--max-queue-per-model", "1024"])


# -- wrk ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    p50_us: float
    requests_per_second: float


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def wrk(url: str, connections: int, seconds: int, script: Path) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script)]
    out = subprocess.run(
        pinned(LOAD_CPU, [*argv, url]), capture_output=True, text=True, check=True
    ).stdout
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if p50 is None or rps is None or errors is not None:
        raise RuntimeError(f"wrk said:\n{out}")
    return WrkResult(float(p50.group(1)) * _UNITS[p50.group(2)], float(rps.group(1)))


# -- streams -----------------------------------------------------------------------------------


async def stream_rates(url: str, streams: int, tokens: int) -> list[float]:
    """Start `streams` generations at once; each one's tokens/s between first and last token."""
    body = {"model": "qwen2.5:7b", "prompt": "count", "options": {"num_predict": tokens}}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> float:
            seen, first, last = 0, 0.0, 0.0
            async with session.post(f"{url}/api/generate", json=body) as response:
                response.raise_for_status()
                async for line in response.content:
                    if b'"done":false' in line:
                        last = time.monotonic()
                        first = first or last
                        seen += 1
            return (seen - 1) / (last - first) if seen > 1 and last > first else 0.0

        return list(await asyncio.gather(*(one() for _ in range(streams))))


def measure_streams(url: str, streams: int, tokens: int) -> float:
    """The median stream's decode rate (the client runs on the load CPU)."""
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    try:
        return statistics.median(asyncio.run(stream_rates(url, streams, tokens)))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


# -- the run -----------------------------------------------------------------------------------


def overhead(seconds: int) -> dict[str, dict[str, WrkResult]]:
    upstream, via_nginx, via_parallama = free_port(), free_port(), free_port()
    results: dict[str, dict[str, WrkResult]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        body = REQUEST.decode().replace("\\", "\\\\").replace('"', '\\"')
        script.write(
            f'wrk.method = "POST"\nwrk.body = "{body}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        script.flush()
        with (
            nginx(fixed_upstream(upstream), upstream, LOAD_CPU),
            nginx(reverse_proxy(via_nginx, upstream), via_nginx, PROXY_CPU),
            running(parallama(via_parallama, upstream, slots=1024), via_parallama),
        ):
            targets = {"direct": upstream, "parallama": via_parallama, "nginx": via_nginx}
            for name, port in targets.items():
                url = f"http://127.0.0.1:{port}/api/generate"
                wrk(url, 8, 1, Path(script.name))  # warm the pools
                results[name] = {
                    "c1": wrk(url, 1, seconds, Path(script.name)),
                    "c32": wrk(url, 32, seconds, Path(script.name)),
                }
    return results


def streaming(streams: int, rate: float, tokens: int) -> dict[str, float]:
    sim, via_nginx, via_parallama = free_port(), free_port(), free_port()
    sim_argv = [sys.executable, "-m", "parallama", "sim", "--port", str(sim)]
    sim_argv += ["--num-parallel", str(streams), "--decode-tps", str(rate)]
    sim_argv += ["--batch-slowdown", "0", "--load-seconds", "0", "--prefill-tps", "100000"]
    rates: dict[str, float] = {}
    with (
        running(pinned(LOAD_CPU, sim_argv), sim),
        nginx(reverse_proxy(via_nginx, sim), via_nginx, PROXY_CPU),
        running(parallama(via_parallama, sim, slots=streams), via_parallama),
    ):
        targets = {"direct": sim, "parallama": via_parallama, "nginx": via_nginx}
        measure_streams(f"http://127.0.0.1:{sim}", 1, 5)  # load the model
        for name, port in targets.items():
            rates[name] = measure_streams(f"http://127.0.0.1:{port}", streams, tokens)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (200)")
    parser.add_argument("--rate", type=float, default=50, help="tokens/s per stream (50)")
    parser.add_argument("--tokens", type=int, default=250, help="tokens per stream (250)")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install nginx-light wrk)")

    print(f"Gateway overhead: trivial upstream, wrk for {args.seconds:g} s per cell")
    r = overhead(args.seconds)
    direct, gw, ngx = r["direct"], r["parallama"], r["nginx"]
    added_gw = gw["c1"].p50_us - direct["c1"].p50_us
    added_ngx = ngx["c1"].p50_us - direct["c1"].p50_us
    print(f"{'':28}{'direct':>12}{'parallama':>12}{'nginx':>12}")
    print(
        f"{'p50 latency, c=1 (us)':28}{direct['c1'].p50_us:12.0f}"
        f"{gw['c1'].p50_us:12.0f}{ngx['c1'].p50_us:12.0f}"
    )
    print(f"{'added p50, c=1 (us)':28}{'':>12}{added_gw:12.0f}{added_ngx:12.0f}")
    print(
        f"{'requests/s, c=32':28}{direct['c32'].requests_per_second:12.0f}"
        f"{gw['c32'].requests_per_second:12.0f}{ngx['c32'].requests_per_second:12.0f}"
    )

    print(f"\nStreaming: {args.streams} concurrent streams at {args.rate:g} tokens/s each")
    s = streaming(args.streams, args.rate, args.tokens)
    print(
        f"{'per-stream tokens/s, p50':28}{s['direct']:12.1f}{s['parallama']:12.1f}"
        f"{s['nginx']:12.1f}"
    )

    print("\nRatios measured in this run (target in brackets):")
    print(f"  parallama added p50 at c=1: {added_gw / 1000:.3f} ms  [< 0.5 ms]")
    print(f"  parallama req/s at c=32: {gw['c32'].requests_per_second:.0f}  [>= 3000]")
    print(f"  parallama streams / direct: {s['parallama'] / s['direct']:.3f}  [>= 0.97]")
    print(f"  nginx streams / direct: {s['nginx'] / s['direct']:.3f}")
    print(
        f"  parallama / nginx: added p50 {added_gw / max(added_ngx, 1):.2f}x, "
        f"req/s {gw['c32'].requests_per_second / ngx['c32'].requests_per_second:.2f}x, "
        f"stream rate {s['parallama'] / s['nginx']:.3f}x"
    )


if __name__ == "__main__":
    main()
