"""The soak benchmark for two minutes (`benchmarks/soak.py`, 20 in its own run): mixed load over
emulated backends with hostile clients among them. The gateway's memory and descriptors stay
flat after the first minute, every request is counted once, and each hostile kind got the
answer it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.timeout(480)  # two minutes of load, and the servers' start and stop
def test_two_minutes_of_mixed_and_hostile_load_leave_the_gateway_as_it_was(
    tmp_path: Path,
) -> None:
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, "soak.py", "--minutes", "2", "--every", "10", "--json", str(out)],
        cwd=BENCHMARKS,
        check=True,
        timeout=400,
        capture_output=True,
    )
    report = orjson.loads(out.read_bytes())
    samples = report["samples"]
    after_a_minute = next(s for s in samples if s["seconds"] >= 60)
    grown = max(s["rss_mb"] for s in samples) - after_a_minute["rss_mb"]
    assert grown < 24, samples  # 2 MB names kept would be +60 MB a minute
    assert max(s["fds"] for s in samples) <= samples[0]["fds"] + 16
    assert report["final_fds"] <= samples[0]["fds"]  # every client connection closed
    final, seen = report["final"], report["client"]
    assert report["adds_up"], final
    assert final["in_flight"] == final["queued"] == 0
    assert final["failed"] == 0
    assert seen.get("slowloris never cut off", 0) == 0 and seen["slowloris cut off"] > 0
    assert {k for k in seen if k.startswith("big name")} == {"big name 400"}
    assert {k for k in seen if k.startswith("big body")} == {"big body 413"}
    assert {k for k in seen if k.startswith("bad json")} == {"bad json 400"}
    assert {k for k in seen if k.startswith("burst")} == {"burst 200"}
    assert seen["chat 200"] > 0 and seen["openai 200"] > 0
    assert final["completed"] >= seen["chat 200"] + seen["openai 200"]
