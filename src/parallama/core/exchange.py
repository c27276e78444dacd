"""One request's record, filled in as it passes through: what the access log and metrics report.

It holds timings, the backend, status, outcome and token counts: never the body, so a prompt
cannot reach a log line by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parallama.errors import excerpt
from parallama.protocol.usage import Usage
from parallama.redaction import redact_keys

if TYPE_CHECKING:
    from parallama.core.trace import Trace


@dataclass(eq=False, slots=True)
class Exchange:
    method: str
    path: str
    client: str
    started: float
    key: str | None = None  # the API key's name, when keys are required
    key_lease: str | None = None  # its place in the key's concurrency, in Redis (shared state)
    model: str | None = None  # set on model routes, once the body is read
    stream: bool = False
    backend: str | None = None
    status: int = 0
    outcome: str | None = None  # model routes only: completed, rejected, timed_out, ...
    error: str | None = None  # the reason the gateway gave, when it refused
    queue_seconds: float | None = None
    first_byte_at: float | None = None
    finished_at: float | None = None
    usage: Usage | None = None
    failed_over: tuple[str, ...] = ()  # the backends it moved away from, in order
    trace: Trace | None = None  # when it is traced (`otlp_endpoint`)

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started

    @property
    def first_token_seconds(self) -> float | None:
        """Time to first token: arrival to the first streamed byte (a whole answer has none)."""
        if not self.stream or self.first_byte_at is None:
            return None
        return self.first_byte_at - self.started

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: the engine's own timing when it reports one, else for a stream the
        tokens over the time between first and last byte."""
        usage = self.usage
        if usage is None or not usage.generated_tokens:
            return None
        if usage.generation_seconds:
            return usage.generated_tokens / usage.generation_seconds
        if self.stream and self.first_byte_at is not None and self.finished_at is not None:
            span = self.finished_at - self.first_byte_at
            return usage.generated_tokens / span if span > 0 else None
        return None

    def log_fields(self) -> dict[str, Any]:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 2)

        fields: dict[str, Any] = {
            "method": self.method,
            "path": excerpt(redact_keys(self.path)),
            "status": self.status,
            "client": self.client,
        }
        if self.key is not None:
            fields["key"] = self.key  # its name: never the key
        if self.model is not None:
            fields.update(model=self.model, stream=self.stream, outcome=self.outcome)
        if self.backend is not None:
            fields["backend"] = self.backend
        fields.update(
            queue_ms=ms(self.queue_seconds),
            ttft_ms=ms(self.first_token_seconds),
            duration_ms=ms(self.seconds),
        )
        if self.usage is not None:
            fields.update(
                prompt_tokens=self.usage.prompt_tokens,
                generated_tokens=self.usage.generated_tokens,
            )
        if self.error is not None:  # bounded: an error may quote what the client sent
            fields["error"] = excerpt(self.error, 300)
        return {k: v for k, v in fields.items() if v is not None}
