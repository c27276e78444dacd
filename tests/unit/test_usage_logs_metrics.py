"""Token counts from an answer's tail, log line shapes and bounded metric labels (no I/O)."""

from __future__ import annotations

import logging

import orjson

from parallama.core.exchange import Exchange
from parallama.gateway.observability.metrics import ModelLabels
from parallama.logs import JsonFormatter, LogfmtFormatter
from parallama.protocol.usage import TAIL_BYTES, Usage, keep_tail, usage_from_tail


def test_ollama_final_line_gives_counts_and_engine_speed() -> None:
    stream = (
        b'{"response":"a","done":false}\n'
        b'{"done":true,"prompt_eval_count":12,"eval_count":40,"eval_duration":2000000000}\n'
    )
    assert usage_from_tail(stream) == Usage(12, 40, 2.0)


def test_openai_usage_object_gives_counts() -> None:
    body = b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}'
    assert usage_from_tail(body) == Usage(7, 3, None)
    sse = b'data: {"choices":[],"usage":{"prompt_tokens": 5, "completion_tokens": 2}}\n\n'
    assert usage_from_tail(sse + b"data: [DONE]\n\n") == Usage(5, 2, None)


def test_counts_quoted_inside_generated_text_do_not_count() -> None:
    line = b'{"response":"say \\"eval_count\\":99","done":false}\n'
    assert usage_from_tail(line) is None


def test_tail_keeps_only_the_last_bytes() -> None:
    tail = b""
    for _ in range(100):
        tail = keep_tail(tail, b"x" * 100)
    tail = keep_tail(tail, b'{"eval_count":5}')
    assert len(tail) == TAIL_BYTES
    assert usage_from_tail(tail) == Usage(None, 5, None)
    assert keep_tail(b"old", b"y" * (TAIL_BYTES + 10)) == b"y" * TAIL_BYTES


def test_exchange_speed_prefers_the_engines_own_timing() -> None:
    stream = Exchange("POST", "/api/chat", "addr:x", started=10.0, stream=True)
    stream.first_byte_at, stream.finished_at = 10.5, 12.5
    stream.usage = Usage(1, 40, None)
    assert stream.first_token_seconds == 0.5
    assert stream.tokens_per_second == 20.0  # 40 tokens between first and last byte
    stream.usage = Usage(1, 40, 0.5)
    assert stream.tokens_per_second == 80.0
    whole = Exchange("POST", "/v1/chat/completions", "addr:x", started=0.0, stream=False)
    whole.first_byte_at, whole.finished_at, whole.usage = 1.0, 1.0, Usage(1, 40, None)
    assert whole.first_token_seconds is None  # a whole answer has no first token to time
    assert whole.tokens_per_second is None


def record(**fields: object) -> logging.LogRecord:
    entry = logging.LogRecord("parallama.access", logging.INFO, "", 0, "request", None, None)
    entry.fields = fields
    return entry


def test_logfmt_quotes_what_needs_quoting() -> None:
    line = LogfmtFormatter().format(record(model="qwen2.5:7b", error='bad "x" y', stream=True))
    assert "level=info logger=parallama.access event=request" in line
    assert "model=qwen2.5:7b" in line
    assert 'error="bad \\"x\\" y"' in line
    assert "stream=true" in line


def test_json_lines_are_objects() -> None:
    entry = orjson.loads(JsonFormatter().format(record(status=200, duration_ms=1.5)))
    assert entry["event"] == "request"
    assert (entry["status"], entry["duration_ms"]) == (200, 1.5)
    assert entry["time"].endswith("Z")


def test_only_models_the_fleet_lists_get_a_label_of_their_own() -> None:
    listed = {"a:latest", "b:latest"}
    labels = ModelLabels(listed.__contains__)
    asked = ("a:latest", "made-up:latest", "b:latest", "x" * 5000, "a:latest")
    assert [labels(m) for m in asked] == ["a:latest", "_other", "b:latest", "_other", "a:latest"]
    assert list(labels.seen) == ["a:latest", "b:latest"]
