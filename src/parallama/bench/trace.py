"""A traffic trace: which requests came when, for which model, how long their prompts and answers
were (sans-I/O). `parallama usage --trace` writes one from the usage ledger; `parallama plan
--replay` replays it on a virtual clock against candidate fleets, and `parallama bench --replay`
against real servers, in real time.

JSON Lines, one request a line, in any order (they are sorted by time):

    {"time": 12.5, "model": "qwen2.5:7b", "prompt_tokens": 310, "generated_tokens": 120,
     "key": "alice"}

`time` is in seconds (from the trace's start: the first request's time is taken as 0); `key`
(who sent it) is optional. A trace holds token counts and times, never a prompt or an answer:
replays make up prompts of the same length, and ask for answers of the same length (at least
one token: requests that generated nothing, such as embeddings, are not chat traffic).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

MAX_LINE = 4096  # bytes: a trace line is a few numbers and two names
MAX_REQUESTS = 1_000_000
MAX_NAME = 256  # a model or key name
MAX_TOKENS = 1_000_000  # per prompt or answer


class TraceError(ValueError):
    """A trace that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class TracedRequest:
    time: float  # seconds from the trace's start
    model: str
    prompt_tokens: int
    generated_tokens: int
    key: str | None = None

    def as_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "time": round(self.time, 6),
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
        }
        if self.key is not None:
            line["key"] = self.key
        return line


# Words that common tokenizers (Llama's, Qwen's, SmolLM's) and the emulator each count as one
# token with their leading space, so a made-up prompt of n words is about n tokens.
_WORDS = """
the of and to in is that for it as with was on be at by this from or have an are but not
you all can had her one our out day get has him his how man new now old see two way who
""".split()  # noqa: SIM905 (a word list reads better as text)
# What a prompt of no words counts, its chat template and its number: the emulator's. An engine
# with a longer template counts more: `parallama bench --replay` asks the target first.
FIXED_TOKENS = 8


def replay_prompt(n: int, tokens: int, salt: str = "", fixed: int = FIXED_TOKENS) -> str:
    """A made-up prompt that counts about `tokens` tokens on an engine where a prompt of no
    words counts `fixed`, for the n-th request of a replay: `salt` (one per run) and its
    number first, so that no two requests, of this run or an earlier one, share a prefix an
    engine could reuse."""
    words = max(tokens - fixed, 0)
    state = n * 2654435761 + tokens
    chosen = []
    for _ in range(words):
        state = (state * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        chosen.append(_WORDS[(state >> 33) % len(_WORDS)])
    return " ".join([f"{salt}{n}", *chosen])


def parse_trace(lines: Iterable[bytes], source: str) -> tuple[TracedRequest, ...]:
    """The requests of a trace's lines (blank ones skipped), sorted by time."""
    requests: list[TracedRequest] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise TraceError(f"{source}:{number}: a line of over {MAX_LINE} bytes")
        if len(requests) == MAX_REQUESTS:
            raise TraceError(f"{source}: over {MAX_REQUESTS:,} requests")
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise TraceError(f"{source}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise TraceError(f"{source}:{number}: expected an object")
        try:
            requests.append(_request(value))
        except ValueError as exc:
            raise TraceError(f"{source}:{number}: {exc}") from None
    if not requests:
        raise TraceError(f"{source} has no requests")
    return _from_zero(requests)


def read_trace(path: Path) -> tuple[TracedRequest, ...]:
    try:
        with path.open("rb") as file:
            # A line at most one byte over the bound is read, and refused for its length.
            lines = iter(lambda: file.readline(MAX_LINE + 1), b"")
            return parse_trace(lines, str(path))
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror}") from None


def trace_lines(requests: Iterable[TracedRequest]) -> Iterable[bytes]:
    for request in requests:
        yield orjson.dumps(request.as_json()) + b"\n"


def from_ledger(rows: Iterable[Mapping[str, Any]]) -> tuple[TracedRequest, ...]:
    """A trace of the ledger's answered requests (status 200) that a trace can hold (a model,
    a prompt, at least one generated token: no embeddings), times from the first arrival.
    Asked for up to `MAX_REQUESTS` + 1 rows, it refuses more than it can keep."""
    rows = list(rows)
    if len(rows) > MAX_REQUESTS:
        raise TraceError(f"over {MAX_REQUESTS:,} requests: ask for a shorter time")
    kept = []
    for row in rows:
        if row.get("status") != 200:
            continue
        line = {
            "time": row.get("at"),
            "model": row.get("model"),
            "prompt_tokens": row.get("prompt_tokens"),
            "generated_tokens": row.get("generated_tokens"),
            "key": row.get("key_name"),
        }
        with contextlib.suppress(ValueError):
            kept.append(_request(line, earliest=-math.inf))
    return _from_zero(kept) if kept else ()


def _from_zero(requests: list[TracedRequest]) -> tuple[TracedRequest, ...]:
    """Sorted by time, the first at 0."""
    start = min(r.time for r in requests)
    return tuple(sorted((replace(r, time=r.time - start) for r in requests), key=lambda r: r.time))


def _request(value: Mapping[str, Any], earliest: float = 0.0) -> TracedRequest:
    """One request, checked; `earliest`: the first time allowed (a ledger's are Unix times)."""
    time, model, key = value.get("time"), value.get("model"), value.get("key")
    if isinstance(time, bool) or not isinstance(time, int | float) or not earliest <= time < 1e10:
        raise ValueError('"time": seconds from the trace\'s start, a number from 0')
    if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME:
        raise ValueError(f'"model": a name of 1 to {MAX_NAME} characters')
    if key is not None and (not isinstance(key, str) or len(key) > MAX_NAME):
        raise ValueError(f'"key": a name of up to {MAX_NAME} characters')
    prompt, generated = _count(value, "prompt_tokens"), _count(value, "generated_tokens")
    return TracedRequest(float(time), model, prompt, generated, key)


def _count(value: Mapping[str, Any], name: str) -> int:
    count = value.get(name)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_TOKENS:
        raise ValueError(f'"{name}": a whole number from 1 to {MAX_TOKENS:,}')
    return count
