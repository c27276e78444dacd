"""What an open dashboard costs the gateway, in one run: the same gateway in front of a trivial
upstream (nginx `return 200`), loaded by wrk, with no dashboard open and with some open (each
reads `/parallama/feed`, a snapshot a second, as the page does).

Printed: p50 latency at concurrency 1 and requests/s at concurrency 32, each way, and what the
open dashboards add (the target, issue 17: they must not slow the gateway).

    python benchmarks/dashboard.py [--seconds 8] [--pages 5]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
from collections.abc import Iterator

from gateway_overhead import (
    LOAD_CPU,
    LOOPBACK,
    PROXY_CPU,
    WrkResult,
    fixed_upstream,
    nginx,
    parallama,
    running,
    wrk,
    wrk_script,
)

from parallama.launch.supervisor import free_port


@contextlib.contextmanager
def pages(port: int, count: int) -> Iterator[list[int]]:
    """`count` readers of the feed, as open dashboards; the bytes each has read so far."""
    read = [0] * count
    stop = threading.Event()
    request = b"GET /parallama/feed HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def reader(n: int) -> None:
        with socket.create_connection((LOOPBACK, port)) as connection:
            connection.sendall(request)
            connection.settimeout(0.5)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    read[n] += len(connection.recv(65536))

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield read
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="per wrk run (default 8)")
    parser.add_argument("--pages", type=int, default=5, help="dashboards open (default 5)")
    args = parser.parse_args()
    upstream, gateway = free_port(LOOPBACK), free_port(LOOPBACK)
    results: dict[str, dict[str, WrkResult]] = {}
    read: list[int] = []
    with (
        wrk_script() as script,
        nginx(fixed_upstream(upstream), upstream, LOAD_CPU),
        running(parallama(gateway, upstream, slots=1024), gateway),
    ):
        url = f"http://127.0.0.1:{gateway}/api/generate"
        wrk(url, 8, 1, script)  # warm the pools
        for name, open_pages in (("no dashboard", 0), (f"{args.pages} dashboards", args.pages)):
            with pages(gateway, open_pages) as read:
                results[name] = {
                    "c1": wrk(url, 1, args.seconds, script),
                    "c32": wrk(url, 32, args.seconds, script),
                }
    print(f"pinned: the gateway to CPU {PROXY_CPU}, wrk and the upstream to CPU {LOAD_CPU}\n")
    print(f"{'':20}{'p50 at c=1 (us)':>17}{'req/s at c=32':>15}")
    for name, cells in results.items():
        print(f"{name:20}{cells['c1'].p50_us:>17.0f}{cells['c32'].requests_per_second:>15.0f}")
    quiet, watched = results.values()
    added = watched["c1"].p50_us - quiet["c1"].p50_us
    ratio = watched["c32"].requests_per_second / quiet["c32"].requests_per_second
    print(f"\nadded p50 with {args.pages} dashboards open: {added:.0f} us; req/s: {ratio:.2f}x")
    print(f"feed bytes each dashboard read: {min(read)} to {max(read)}")


if __name__ == "__main__":
    main()
