"""`--plot FILE.png`: the latency distribution of every setup, and for a sweep, throughput and
latency against the level (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

from parallama.bench.runner import Result


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = result.plan
    sweep = len(plan.levels) > 1
    figure, axes = plt.subplots(1, 3 if sweep else 1, figsize=(15 if sweep else 6, 4.5))
    cdf = axes[0] if sweep else axes
    for setup in plan.setups:
        for level in plan.levels:
            latencies = sorted(
                s.latency
                for s in result.samples
                if s.setup == setup.label and s.level == level and s.ok
            )
            if not latencies:
                continue
            share = [(i + 1) / len(latencies) for i in range(len(latencies))]
            name = f"{setup.label} @ {level:g}" if sweep else setup.label
            cdf.step(latencies, share, where="post", label=name)
    cdf.set_xlabel("latency (s)")
    cdf.set_ylabel("share of requests")
    cdf.set_title("Latency distribution")
    cdf.grid(alpha=0.3)
    cdf.legend(fontsize="small")
    if sweep:
        summaries = result.summaries()
        level_name = "concurrency" if plan.mode == "concurrency" else "requests/s offered"
        for n, setup in enumerate(plan.setups):
            color = f"C{n}"  # one colour per setup on both charts
            mine = [s for s in summaries if s.setup == setup.label]
            levels = [s.level for s in mine]
            axes[1].plot(levels, [s.qps for s in mine], "o-", color=color, label=setup.label)
            p50 = [s.latency["p50"] for s in mine]
            p99 = [s.latency["p99"] for s in mine]
            axes[2].plot(levels, p50, "o-", color=color, label=f"{setup.label} p50")
            axes[2].plot(levels, p99, "x--", color=color, label=f"{setup.label} p99")
        axes[1].set_title("Throughput")
        axes[1].set_ylabel("completed requests/s")
        axes[2].set_title("Latency")
        axes[2].set_ylabel("seconds")
        for axis in axes[1:]:
            axis.set_ylim(bottom=0)
            axis.set_xlabel(level_name)
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
    figure.suptitle(f"parallama bench: {plan.workload.model}, {plan.workload.kind}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
