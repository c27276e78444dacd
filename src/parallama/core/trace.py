"""A request's trace (sans-I/O): its W3C trace context, and the spans it makes, built from what
the gateway recorded once the request ended (nothing is timed twice on the request path).

A request that arrives with a sampled `traceparent` continues that trace; one without is
sampled at `trace_sample`. The spans: the request (SERVER), its wait in the queue, each attempt
on a backend (CLIENT; the `traceparent` the backend was sent names it), and the stream relayed
from the last attempt. In OTLP's JSON form, ready to send.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parallama.core.exchange import Exchange

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_SERVER, _CLIENT, _INTERNAL = 2, 3, 1  # OTLP span kinds
_ERROR = 2  # OTLP status code


def _new_id(size: int) -> str:
    return os.urandom(size).hex()


@dataclass(slots=True)
class Attempt:
    """One try on a backend: when, and how it went."""

    backend: str
    span_id: str
    started: float
    ended: float = 0.0
    status: int = 0
    outcome: str = ""  # answered, failed over, failed


@dataclass(slots=True)
class Trace:
    trace_id: str
    span_id: str  # the request's own span
    parent_id: str = ""  # the caller's span, from its traceparent
    attempts: list[Attempt] = field(default_factory=list)

    def attempt(self, backend: str, now: float) -> Attempt:
        """A new try on `backend`: its span, named in the `traceparent` the backend is sent."""
        attempt = Attempt(backend, _new_id(8), now)
        self.attempts.append(attempt)
        return attempt

    def traceparent(self, attempt: Attempt) -> bytes:
        return f"00-{self.trace_id}-{attempt.span_id}-01".encode()


def begin(traceparent: str | None, sample: float, chance: random.Random) -> Trace | None:
    """The request's trace if it is to be traced: the caller's (a valid, sampled
    `traceparent`), else a new one at the `sample` rate."""
    found = _TRACEPARENT.match((traceparent or "").strip().lower())
    if found is not None and found[1] != "0" * 32 and found[2] != "0" * 16:
        if not int(found[3], 16) & 1:
            return None  # the caller decided: not sampled
        return Trace(found[1], _new_id(8), found[2])
    if sample <= 0 or chance.random() >= sample:
        return None
    return Trace(_new_id(16), _new_id(8))


def _attributes(values: dict[str, Any]) -> list[dict[str, Any]]:
    encoded = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            encoded.append({"key": key, "value": {"boolValue": value}})
        elif isinstance(value, int):
            encoded.append({"key": key, "value": {"intValue": str(value)}})
        elif isinstance(value, float):
            encoded.append({"key": key, "value": {"doubleValue": value}})
        else:
            encoded.append({"key": key, "value": {"stringValue": str(value)}})
    return encoded


def spans(trace: Trace, ended: Exchange, epoch: float) -> list[dict[str, Any]]:
    """The spans of a request that ended (its record), in OTLP JSON; `epoch` turns monotonic
    times into Unix time."""
    finished = ended.finished_at or ended.started
    usage = ended.usage
    prompt_tokens = None if usage is None else usage.prompt_tokens
    generated_tokens = None if usage is None else usage.generated_tokens

    def ns(moment: float) -> str:
        return str(int((epoch + moment) * 1e9))

    def span(
        span_id: str,
        parent: str,
        name: str,
        *,
        kind: int,
        start: float,
        end: float,
        attributes: dict[str, Any],
        failed: bool = False,
    ) -> dict[str, Any]:
        made: dict[str, Any] = {
            "traceId": trace.trace_id,
            "spanId": span_id,
            "name": name,
            "kind": kind,
            "startTimeUnixNano": ns(start),
            "endTimeUnixNano": ns(max(start, end)),
            "attributes": _attributes(attributes),
        }
        if parent:
            made["parentSpanId"] = parent
        if failed:
            made["status"] = {"code": _ERROR}
        return made

    made = [
        span(
            trace.span_id,
            trace.parent_id,
            f"{ended.method} {ended.path}",
            kind=_SERVER,
            start=ended.started,
            end=finished,
            attributes={
                "http.request.method": ended.method,
                "url.path": ended.path,
                "http.response.status_code": ended.status,
                "gen_ai.request.model": ended.model,
                "gen_ai.usage.input_tokens": prompt_tokens,
                "gen_ai.usage.output_tokens": generated_tokens,
                "parallama.outcome": ended.outcome,
                "parallama.queue_ms": None
                if ended.queue_seconds is None
                else round(ended.queue_seconds * 1000, 3),
                "parallama.key": ended.key,
                "parallama.failovers": max(0, len(trace.attempts) - 1),
                "error.type": ended.error,
            },
            failed=ended.status >= 500,
        )
    ]
    if ended.model is not None:
        waited_until = trace.attempts[0].started if trace.attempts else finished
        made.append(
            span(
                _new_id(8),
                trace.span_id,
                "queue",
                kind=_INTERNAL,
                start=ended.started,
                end=waited_until,
                attributes={"parallama.queue_ms": round((waited_until - ended.started) * 1000, 3)},
            )
        )
    for n, attempt in enumerate(trace.attempts, 1):
        made.append(
            span(
                attempt.span_id,
                trace.span_id,
                f"upstream {attempt.backend}",
                kind=_CLIENT,
                start=attempt.started,
                end=attempt.ended or finished,
                attributes={
                    "server.address": attempt.backend,
                    "parallama.attempt": n,
                    "parallama.attempt.outcome": attempt.outcome or None,
                    "http.response.status_code": attempt.status or None,
                },
                failed=attempt.outcome != "answered",
            )
        )
    if ended.stream and ended.first_byte_at is not None and trace.attempts:
        made.append(
            span(
                _new_id(8),
                trace.attempts[-1].span_id,
                "stream",
                kind=_INTERNAL,
                start=ended.first_byte_at,
                end=finished,
                attributes={"gen_ai.usage.output_tokens": generated_tokens},
            )
        )
    return made
