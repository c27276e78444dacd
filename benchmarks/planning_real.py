"""The planner checked against real engines, in one run: calibrate on one real llama.cpp server,
predict one and two servers under a replayed trace, run the same trace for real through
`parallama up` with one and two engines, and print prediction against measurement.

SmolLM2-135M-Instruct on llama.cpp's llama-server, one thread and one slot each; the trace is
seeded: Poisson arrivals at `--rate` per second, prompts of 40 to 200 tokens, answers of 8 to
48. Each step is the `parallama` command a user would type:

    parallama up --engine llama-server --instances N --model SMOLLM2.gguf --threads 1 ...
    parallama plan --calibrate ENGINE --api openai --model smollm2:135m --out profile.toml
    parallama plan --replay trace.jsonl --profile profile.toml --instances 1,2 --json plan.json
    parallama bench GATEWAY --api openai --replay trace.jsonl --json run.json

llama-server and the model are found, or built and fetched once.

    python benchmarks/planning_real.py [--requests 60] [--rate 0.45] [--seed 3]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import orjson
from processes import started

from parallama.bench.trace import TracedRequest, trace_lines
from parallama.launch.engines import SMOLLM2_ALIAS
from parallama.launch.llama_build import ensure_smollm2

COLUMNS = (("qps", "QPS"), ("p50", "p50 latency"), ("p99", "p99 latency"), ("ttft", "TTFT p50"))


def make_trace(requests: int, rate: float, seed: int) -> list[TracedRequest]:
    choose = random.Random(seed)
    time, out = 0.0, []
    for _ in range(requests):
        time += choose.expovariate(rate)
        out.append(
            TracedRequest(time, SMOLLM2_ALIAS, choose.randint(40, 200), choose.randint(8, 48))
        )
    return out


def parallama(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "parallama", *args], check=True, stdout=sys.stderr)


def figures(report: dict[str, Any], setup: str | None = None) -> dict[str, float]:
    (summary,) = [s for s in report["summaries"] if setup is None or s["setup"] == setup]
    return {
        "qps": summary["qps"],
        "p50": summary["latency"]["p50"],
        "p99": summary["latency"]["p99"],
        "ttft": summary["first_token"]["p50"],
        "errors": sum(summary["errors"].values()),
    }


def up(engines: int, logs: Path) -> Any:
    model = ensure_smollm2()
    return started(
        *("up", "--engine", "llama-server", "--instances", str(engines), "--model", str(model)),
        *("--alias", SMOLLM2_ALIAS, "--threads", "1", "--parallel", "1"),
        *("--base-port", "0", "--port", "0"),
        *("--health-interval", "1", "--log-dir", str(logs), "--no-log-requests"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="in the trace (60)")
    parser.add_argument("--rate", type=float, default=0.45, help="arrivals per second (0.45)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    trace, profile = folder / "trace.jsonl", folder / "profile.toml"
    trace.write_bytes(b"".join(trace_lines(make_trace(args.requests, args.rate, args.seed))))
    measured: dict[int, dict[str, float]] = {}
    for engines in (1, 2):
        with up(engines, folder / f"logs{engines}") as urls:
            gateway, first_engine = urls[0], urls[1]
            if engines == 1:
                parallama(
                    *("plan", "--calibrate", first_engine, "--api", "openai"),
                    *("--model", SMOLLM2_ALIAS, "--out", str(profile)),
                )
                parallama(
                    *("plan", "--replay", str(trace), "--profile", str(profile)),
                    *("--instances", "1,2", "--json", str(folder / "plan.json")),
                )
            out = folder / f"run{engines}.json"
            parallama(
                *("bench", gateway, "--api", "openai", "--replay", str(trace)),
                *("--json", str(out)),
            )
            measured[engines] = figures(orjson.loads(out.read_bytes()))
            httpx.get(f"{gateway}/parallama/status", timeout=5).raise_for_status()
    plan = orjson.loads((folder / "plan.json").read_bytes())
    predicted = {
        n: figures(plan, s["setup"]) for n, s in zip((1, 2), plan["summaries"], strict=True)
    }
    print(profile.read_text())
    print(
        f"A trace of {args.requests} requests, {args.rate:g}/s (seed {args.seed}), replayed on "
        "SmolLM2-135M, llama.cpp's llama-server, one thread and one slot each:\n"
    )
    print("| engines | | " + " | ".join(name for _, name in COLUMNS) + " | errors |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for n in (1, 2):
        for label, row in (("predicted", predicted[n]), ("measured", measured[n])):
            cells = [f"{row['qps']:.3f}"] + [f"{row[k]:.2f} s" for k, _ in COLUMNS[1:]]
            print(f"| {n} | {label} | " + " | ".join(cells) + f" | {row['errors']:.0f} |")
        ratios = [predicted[n][k] / measured[n][k] for k, _ in COLUMNS]
        print(f"| {n} | predicted / measured | " + " | ".join(f"{r:.2f}x" for r in ratios) + " | |")
    print(f"\n(files in {folder})")


if __name__ == "__main__":
    main()
