"""Go-style durations, as Ollama accepts them for `keep_alive` and `OLLAMA_KEEP_ALIVE`.

Ollama reads `keep_alive` as a JSON number of seconds or a Go duration string ("5m", "1h30m",
"300ms"); any negative value means "keep loaded forever". We return seconds as a float and use
`math.inf` for forever, so callers can compare and add without special cases.
"""

from __future__ import annotations

import math
import re

FOREVER = math.inf

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_COMPONENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A duration that neither Go's `time.ParseDuration` nor Ollama would accept."""


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string into seconds (negative values stay negative)."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise DurationError(f'time: invalid duration "{text}"')
    pos = 0
    total = 0.0
    while pos < len(s):
        match = _COMPONENT.match(s, pos)
        if match is None:
            if re.match(r"(\d+(?:\.\d*)?|\.\d+)$", s[pos:]):
                raise DurationError(f'time: missing unit in duration "{text}"')
            raise DurationError(f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return sign * total


def keep_alive_seconds(value: object) -> float:
    """Interpret a request's `keep_alive` (number of seconds or duration string).

    Negative means forever, as in Ollama's `api.Duration`.
    """
    if isinstance(value, bool):
        raise DurationError("invalid keep_alive: expected a number or a duration string")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    else:
        raise DurationError("invalid keep_alive: expected a number or a duration string")
    if math.isnan(seconds):
        raise DurationError("invalid keep_alive: not a number")
    return FOREVER if seconds < 0 else seconds


def env_keep_alive_seconds(text: str) -> float:
    """Interpret `OLLAMA_KEEP_ALIVE`: a Go duration, or else a whole number of seconds."""
    try:
        seconds = parse_go_duration(text)
    except DurationError:
        try:
            seconds = float(int(text.strip()))
        except ValueError:
            raise DurationError(f"invalid OLLAMA_KEEP_ALIVE {text!r}") from None
    return FOREVER if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way a person writes a keep-alive ("5m", "1h30m", "forever")."""
    if math.isinf(seconds):
        return "forever"
    if seconds == 0:
        return "0s"
    whole = int(seconds)
    if whole != seconds or whole < 60:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts)
