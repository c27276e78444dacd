"""What `parallama serve --workers 2` buys on this machine, in one run: the same upstreams
through one gateway process (`state = "memory"`, and with Redis) and through two workers on one
port sharing their slots through Redis (a local redis-server, started here).

1. Requests/s at concurrency 64 against a trivial fixed-response upstream (nginx `return 200`),
   loaded by wrk, and the p50 latency at concurrency 1.
2. 1,000 streams at 50 tokens/s from the lean paced upstream of `gateway_overhead.py`: the rate
   each stream sees, and the gateway's CPU (all its processes).

Nothing is pinned but the load (wrk, the upstreams, the stream clients: CPU 1), so the workers
share the machine's cores with it, as they would in use. Target (issue 16): two workers give
>= 1.7x one worker's requests/s on a 2-core machine.

    python benchmarks/workers.py [--seconds 10] [--streams 1000]

Needs nginx, wrk and redis-server on PATH.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time

from gateway_overhead import (
    LOAD_CPU,
    LOOPBACK,
    StreamResult,
    WrkResult,
    _cpu_seconds,
    _with_children,
    fixed_upstream,
    measure_streams,
    nginx,
    pinned,
    running,
    wrk,
    wrk_script,
)
from gateway_overhead import __file__ as overhead_script
from processes import redis

from parallama.launch.supervisor import free_port

SETUPS = {  # name -> (workers, shared state)
    "1 worker": (1, False),
    "1 worker, Redis": (1, True),
    "2 workers, Redis": (2, True),
}


def gateway(port: int, upstream: int, slots: int, workers: int, state: str | None) -> list[str]:
    argv = [sys.executable, "-m", "parallama", "serve", "--port", str(port), "--no-log-requests"]
    argv += ["--backend", f"http://127.0.0.1:{upstream}", "--slots", str(slots)]
    argv += ["--max-queue-per-model", "1024", "--workers", str(workers)]
    return argv + (["--state", state] if state else [])


def throughput(
    seconds: int, state: str, redis_pid: int
) -> tuple[dict[str, dict[str, WrkResult]], dict[str, dict[str, float]]]:
    """wrk's results per setup, and the cores each part used during the run at c=64."""
    upstream = free_port(LOOPBACK)
    results: dict[str, dict[str, WrkResult]] = {}
    cores: dict[str, dict[str, float]] = {}
    with (
        wrk_script() as script,
        nginx(fixed_upstream(upstream), upstream, LOAD_CPU) as upstream_nginx,
    ):
        for name, (workers, shared) in SETUPS.items():
            port = free_port(LOOPBACK)
            argv = gateway(port, upstream, 1024, workers, state if shared else None)
            with running(argv, port) as parent:
                url = f"http://127.0.0.1:{port}/api/generate"
                wrk(url, 64, 2, script)  # warm every worker's pools
                c1 = wrk(url, 1, seconds, script)
                parts = {
                    "gateway": _with_children(parent.pid),
                    "redis": [redis_pid],
                    "upstream": _with_children(upstream_nginx.pid),
                }
                before = {part: _cpu_seconds(pids) for part, pids in parts.items()}
                load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                began = time.monotonic()
                c64 = wrk(url, 64, seconds, script)
                took = time.monotonic() - began
                load = resource.getrusage(resource.RUSAGE_CHILDREN)
                cores[name] = {
                    part: (_cpu_seconds(pids) - before[part]) / took for part, pids in parts.items()
                }
                cores[name]["wrk"] = (
                    load.ru_utime + load.ru_stime - load_before.ru_utime - load_before.ru_stime
                ) / took
                results[name] = {"c1": c1, "c64": c64}
    return results, cores


def streaming(streams: int, state: str) -> dict[str, StreamResult]:
    upstream = free_port(LOOPBACK)
    upstream_argv = [sys.executable, overhead_script, "--upstream", str(upstream), "50"]
    results: dict[str, StreamResult] = {}
    with running(pinned(LOAD_CPU, upstream_argv), upstream):
        for name, (workers, shared) in SETUPS.items():
            port = free_port(LOOPBACK)
            argv = gateway(port, upstream, streams, workers, state if shared else None)
            with running(argv, port) as parent:
                pids = _with_children(parent.pid)
                results[name] = measure_streams(port, streams, 500, 2.0, pids, rss=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (1000)")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install nginx-light wrk redis)")
    with redis() as (state, redis_pid):
        r, cpu_c64 = throughput(args.seconds, state, redis_pid)
        s = streaming(args.streams, state)
    print(f"{'':34}" + "".join(f"{name:>18}" for name in SETUPS))
    print(f"{'p50 latency, c=1 (us)':34}" + "".join(f"{r[n]['c1'].p50_us:18.0f}" for n in SETUPS))
    rps = {n: r[n]["c64"].requests_per_second for n in SETUPS}
    print(f"{'requests/s, c=64':34}" + "".join(f"{rps[n]:18.0f}" for n in SETUPS))
    print(f"{'per-stream tokens/s, p50':34}" + "".join(f"{s[n].rate_p50:18.1f}" for n in SETUPS))
    print(f"{'streams that failed':34}" + "".join(f"{s[n].errors:18d}" for n in SETUPS))
    cpu = "".join(f"{100 * (s[n].cpu_share or 0):18.0f}" for n in SETUPS)
    print(f"{'gateway CPU, streams (% of a core)':34}{cpu}")
    for part in ("gateway", "redis", "upstream", "wrk"):
        used = "".join(f"{cpu_c64[n][part]:18.2f}" for n in SETUPS)
        print(f"{f'cores used at c=64: {part}':34}{used}")
    print("\nRatios measured in this run (target in brackets):")
    two, one, one_redis = rps["2 workers, Redis"], rps["1 worker"], rps["1 worker, Redis"]
    print(f"  2 workers / 1 worker, req/s: {two / one:.2f}x  [>= 1.7x]")
    print(f"  2 workers / 1 worker with Redis, req/s: {two / one_redis:.2f}x")
    print(f"  1 worker with Redis / without, req/s: {one_redis / one:.2f}x")
    added = r["1 worker, Redis"]["c1"].p50_us - r["1 worker"]["c1"].p50_us
    print(f"  added by Redis at p50, c=1: {added / 1000:.3f} ms  [<= 0.3 ms]")


if __name__ == "__main__":
    main()
