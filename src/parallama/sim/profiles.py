"""Timing profiles by name (the seed's hardware rows, `sim.timing.PROFILES`) or from a TOML file,
as `parallama plan --calibrate` writes one from what a real engine did:

    # parallama timing profile: calibrated on http://127.0.0.1:8080 (SmolLM2), 2026-12-01
    prefill_tps = 412.5
    prefill_offset = 28.0
    decode_tps = 61.2
    batch_curve = [1.0, 1.83]
    load_seconds = 0.0

`parallama sim --profile FILE` and `parallama plan --profile FILE` both take it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from parallama.errors import ConfigError
from parallama.sim.timing import PROFILES, TimingModel

_FIELDS = {
    "prefill_tps",
    "prefill_offset",
    "decode_tps",
    "batch_slowdown",
    "load_seconds",
    "batch_knee",
}


def timing_for(profile: str) -> TimingModel:
    """A named profile's timing, or a profile file's (a name that ends in .toml)."""
    if profile in PROFILES:
        return PROFILES[profile].timing
    if not profile.endswith(".toml"):
        names = ", ".join(sorted(PROFILES))
        raise ConfigError(f"--profile {profile!r}: one of {names}, or a profile file (.toml)")
    return read_profile(Path(profile))


def read_profile(path: Path) -> TimingModel:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from None
    unknown = set(data) - _FIELDS - {"batch_curve"}
    if unknown:
        raise ConfigError(f"{path}: unknown fields {', '.join(sorted(unknown))}")
    curve = data.get("batch_curve", [])
    numbers = [v for k, v in data.items() if k in _FIELDS] + (
        curve if isinstance(curve, list) else []
    )
    if not isinstance(curve, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in numbers
    ):
        raise ConfigError(
            f"{path}: numbers only ({', '.join(sorted(_FIELDS))}), and batch_curve a list of them"
        )
    if "prefill_tps" not in data or "decode_tps" not in data:
        raise ConfigError(f"{path}: prefill_tps and decode_tps are needed")
    try:
        return TimingModel(
            prefill_tps=float(data["prefill_tps"]),
            prefill_offset=float(data.get("prefill_offset", 0.0)),
            decode_tps=float(data["decode_tps"]),
            batch_slowdown=float(data.get("batch_slowdown", 0.6)),
            load_seconds=float(data.get("load_seconds", 0.0)),
            batch_knee=int(data.get("batch_knee", 0)),
            batch_curve=tuple(float(v) for v in curve),
        )
    except (ValueError, OverflowError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def profile_text(timing: TimingModel, comment: str) -> str:
    """The profile as a TOML file, with `comment` (where it was measured) on top."""
    lines = [
        f"# parallama timing profile: {comment}",
        f"prefill_tps = {timing.prefill_tps:.5g}  # prompt tokens/s, one sequence",
        f"prefill_offset = {timing.prefill_offset:.4g}  # tokens of every prompt not evaluated",
        f"decode_tps = {timing.decode_tps:.5g}  # generated tokens/s, one sequence alone",
    ]
    if timing.batch_curve:
        factors = ", ".join(f"{f:.4g}" for f in timing.batch_curve)
        lines.append(f"batch_curve = [{factors}]  # times slower with 1, 2, ... sequences busy")
    else:
        lines.append(f"batch_slowdown = {timing.batch_slowdown:g}")
        if timing.batch_knee:
            lines.append(f"batch_knee = {timing.batch_knee}")
    lines.append(f"load_seconds = {timing.load_seconds:g}")
    return "\n".join(lines) + "\n"
