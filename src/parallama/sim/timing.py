"""How long an emulated GPU takes: prefill, decode and model load (sans-I/O, no clock needed).

A sequence's speed depends on how many sequences of the same model share the batch. Batching is
not free: with `b` busy slots each sequence runs `1 + batch_slowdown * (b - 1)` times slower, so
aggregate tokens/s rises with `b` and flattens (b / (1 + k(b-1)) → 1/k), while per-request
tokens/s falls. With the default k = 0.6 that gives 1.4x at 4 and 1.5x at 8 concurrent
sequences: the shape community measurements of Ollama show on one consumer GPU.

`batch_knee` (0: none) models an engine with room for that many sequences only (KV memory, or
cores): past it, each more sequence slows every one by a whole step, so aggregate tokens/s
peaks at the knee and falls after it, and a slot count above it costs throughput.

A calibrated profile (`parallama plan --calibrate`, `sim.profiles`) measures the shape instead:
`batch_curve` lists how many times slower one sequence decodes with 1, 2, 3 ... sequences busy,
as the engine did; past its end the curve goes on along its last step. `prefill_offset` is the
intercept of the prefill's line: tokens of every prompt that the engine did not evaluate (its
chat template, which it keeps cached from the request before), or, negative, a fixed cost.

The named profiles are the rows of the seed document's throughput table: `decode_tps` is that
row's tokens/s for one sequence. Prefill and load times are plausible values for the hardware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TimingModel:
    prefill_tps: float  # prompt tokens per second, one sequence
    decode_tps: float  # generated tokens per second, one sequence alone
    batch_slowdown: float = 0.6  # extra cost per additional busy slot of the same model
    load_seconds: float = 2.0  # time to load a model into memory
    batch_knee: int = 0  # sequences past which each more one costs a whole step (0: none)
    batch_curve: tuple[float, ...] = ()  # measured slowdown at 1, 2, 3 ... busy (replaces both)
    # Calibrated: prompt tokens no request pays for (a chat template the engine keeps cached),
    # or, below 0, a fixed cost in tokens' time that every prefill pays.
    prefill_offset: float = 0.0

    def __post_init__(self) -> None:
        numbers = (self.prefill_tps, self.decode_tps, self.batch_slowdown, self.load_seconds)
        if not all(map(math.isfinite, (*numbers, self.prefill_offset, *self.batch_curve))):
            raise ValueError("timing values must be finite numbers")
        if self.prefill_tps <= 0 or self.decode_tps <= 0:
            raise ValueError("prefill and decode rates must be positive")
        if self.batch_slowdown < 0 or self.load_seconds < 0 or self.batch_knee < 0:
            raise ValueError("batch_slowdown, load_seconds and batch_knee must not be negative")
        if any(factor <= 0 for factor in self.batch_curve):
            raise ValueError("batch_curve: positive factors, one per number of busy sequences")

    def slowdown(self, busy_slots: int) -> float:
        """How many times slower one sequence runs when `busy_slots` share the model."""
        if self.batch_curve:
            curve, busy = self.batch_curve, max(busy_slots, 1)
            if busy <= len(curve):
                return curve[busy - 1]
            step = curve[-1] - curve[-2] if len(curve) > 1 else self.batch_slowdown
            return curve[-1] + max(step, 0.0) * (busy - len(curve))
        past_knee = max(busy_slots - self.batch_knee, 0) if self.batch_knee else 0
        return 1.0 + self.batch_slowdown * max(busy_slots - 1, 0) + past_knee

    def evaluated_tokens(self, prompt_tokens: int, cached: int) -> float:
        """The prompt tokens a prefill pays for: those past what the slot held (`cached`) and
        past `prefill_offset`, which lies at the start too (a template both may cover); a
        negative offset adds its cost to every prefill."""
        if self.prefill_offset < 0:
            return prompt_tokens - cached - self.prefill_offset
        return max(prompt_tokens - max(cached, self.prefill_offset), 0.0)

    def prefill_seconds(self, prompt_tokens: float, busy_slots: int) -> float:
        return prompt_tokens / self.prefill_tps * self.slowdown(busy_slots)

    def token_seconds(self, busy_slots: int) -> float:
        """Time to decode one token of one sequence while `busy_slots` are busy."""
        return self.slowdown(busy_slots) / self.decode_tps

    def aggregate_tps(self, busy_slots: int) -> float:
        """Total decode tokens/s over all busy sequences (what capacity planning needs)."""
        return busy_slots / self.token_seconds(busy_slots) if busy_slots else 0.0

    def with_overrides(
        self,
        *,
        prefill_tps: float | None = None,
        decode_tps: float | None = None,
        batch_slowdown: float | None = None,
        load_seconds: float | None = None,
        batch_knee: int | None = None,
    ) -> TimingModel:
        shape = batch_slowdown is not None or batch_knee is not None
        return replace(
            self,
            batch_curve=() if shape else self.batch_curve,  # the flags' shape, not the curve's
            batch_knee=self.batch_knee if batch_knee is None else batch_knee,
            prefill_tps=self.prefill_tps if prefill_tps is None else prefill_tps,
            decode_tps=self.decode_tps if decode_tps is None else decode_tps,
            batch_slowdown=self.batch_slowdown if batch_slowdown is None else batch_slowdown,
            load_seconds=self.load_seconds if load_seconds is None else load_seconds,
        )


@dataclass(frozen=True)
class Profile:
    name: str
    hardware: str
    model: str  # the model the seed's table measured on this hardware
    p50_latency_ms: int  # the seed's figures, kept for reports that compare against them
    qps: float
    timing: TimingModel


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "m2-8gb", "M2 MacBook 8GB", "qwen2.5:7b", 800, 1.2, TimingModel(150, 15, load_seconds=4)
        ),
        Profile(
            "m2-16gb",
            "M2 MacBook 16GB",
            "qwen2.5:7b",
            500,
            2.0,
            TimingModel(250, 25, load_seconds=3),
        ),
        Profile(
            "m2-pro-32gb",
            "M2 Pro 32GB",
            "qwen2.5:14b",
            900,
            1.5,
            TimingModel(200, 20, load_seconds=5),
        ),
        Profile(
            "rtx3090",
            "RTX 3090 24GB",
            "llama3.1:70b",
            200,
            5.0,
            TimingModel(1500, 80, load_seconds=8),
        ),
        Profile(
            "rtx4090",
            "RTX 4090 24GB",
            "qwen2.5:32b",
            350,
            3.5,
            TimingModel(1200, 55, load_seconds=5),
        ),
        Profile(
            "2x-rtx4090",
            "2x RTX 4090 48GB",
            "qwen2.5:72b",
            600,
            2.0,
            TimingModel(800, 35, load_seconds=10),
        ),
        # Not in the seed: a fast profile for demos and tests that should not wait.
        Profile(
            "fast",
            "emulated, no waiting to speak of",
            "qwen2.5:7b",
            20,
            50.0,
            TimingModel(20000, 500, load_seconds=0.2),
        ),
    )
}
DEFAULT_PROFILE = "rtx4090"
