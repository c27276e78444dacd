"""How busy an engine says it is, from its own pages (sans-I/O): what the gateway needs to leave
room for requests that reach the engine some other way.

- llama.cpp's server, `GET /slots` (on by default; 501 with `--no-slots`): a JSON array with one
  object per slot, `is_processing` true while it runs a request (older versions: `state`, 0 when
  idle).
- vLLM, `GET /metrics` (Prometheus text): `vllm:num_requests_running` and
  `vllm:num_requests_waiting`, labelled `model_name` (and `engine`).
- Ollama has no such page: `/api/ps` lists loaded models, never how busy they are.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson

Source = Literal["slots", "vllm"]
SOURCES: tuple[Source, ...] = ("slots", "vllm")  # in the order `auto` tries them
SLOTS_PATH = b"/slots"
METRICS_PATH = b"/metrics"
MAX_PAGE = 4 * 1024 * 1024  # bytes of a page read at most (vLLM's /metrics is some 100 KB)
_VLLM_BUSY = re.compile(
    rb"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+]+)\s*$", re.MULTILINE
)


def busy_slots(body: bytes) -> int | None:
    """llama.cpp server's `/slots`: how many slots run a request; None if it is not that page."""
    if len(body) > MAX_PAGE:
        return None
    try:
        slots: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(slots, list) or not all(isinstance(s, dict) for s in slots):
        return None
    if all("is_processing" in s for s in slots):
        return sum(1 for s in slots if s["is_processing"] is True)
    if all(isinstance(s.get("state"), int) for s in slots):
        return sum(1 for s in slots if s["state"] != 0)
    return None


def vllm_busy(body: bytes) -> int | None:
    """vLLM's `/metrics`: requests running and waiting, over all its models and engines; None if
    the page has neither gauge."""
    values = _VLLM_BUSY.findall(body[:MAX_PAGE])
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return None
    if not numbers or not all(0 <= n < 1e9 for n in numbers):  # also NaN and infinities
        return None
    return round(sum(numbers))


def read(source: Source, body: bytes) -> int | None:
    return busy_slots(body) if source == "slots" else vllm_busy(body)


def path_of(source: Source) -> bytes:
    return SLOTS_PATH if source == "slots" else METRICS_PATH
