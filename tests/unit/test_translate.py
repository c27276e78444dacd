"""Ollama <-> OpenAI translation, both ways, on recorded shapes of real answers (sans-I/O)."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from parallama.errors import ApiError
from parallama.protocol.translate import (
    AnswerTranslator,
    BadAnswer,
    error_message,
    ollama_request,
    ollama_status,
)

T0 = 1_700_000_000.0  # the client's request reached the gateway
SENT = T0 + 0.5  # and left for the engine after half a second in the queue


def request(path: str, **fields: Any) -> tuple[bytes, dict[str, Any]]:
    translated = ollama_request(path, orjson.dumps({"model": "smollm2:135m", **fields}), T0)
    return translated.target, orjson.loads(translated.body)


def sse(*events: Any) -> bytes:
    """Server-sent events as sse-starlette writes them (CRLF line ends)."""
    out = b""
    for event in events:
        data = event if isinstance(event, bytes) else orjson.dumps(event)
        out += b"data: " + data + b"\r\n\r\n"
    return out


def lines(ndjson: bytes) -> list[dict[str, Any]]:
    assert ndjson.endswith(b"\n")
    return [orjson.loads(line) for line in ndjson.splitlines()]


# -- requests ----------------------------------------------------------------------------------


def test_chat_becomes_a_chat_completion_with_options_mapped() -> None:
    target, body = request(
        "/api/chat",
        messages=[{"role": "user", "content": "hi"}],
        options={"temperature": 0.2, "num_predict": 16, "seed": 7, "stop": ["\n"], "num_ctx": 99},
        format="json",
    )
    assert target == b"/v1/chat/completions"
    assert body == {
        "model": "smollm2:135m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "seed": 7,
        "stop": ["\n"],
        "max_tokens": 16,
        "response_format": {"type": "json_object"},
        "stream": True,  # Ollama streams unless told not to
        "stream_options": {"include_usage": True},  # for the final chunk's counts
    }


def test_generate_applies_the_chat_template_unless_raw() -> None:
    target, body = request("/api/generate", prompt="Why?", system="Be brief.", stream=False)
    assert target == b"/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
    ]
    assert body["stream"] is False
    assert "stream_options" not in body
    target, body = request("/api/generate", prompt="Once upon", raw=True, suffix="end")
    assert target == b"/v1/completions"
    assert (body["prompt"], body["suffix"]) == ("Once upon", "end")


def test_images_tools_and_schemas_take_openai_shapes() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    _, body = request(
        "/api/chat",
        messages=[
            {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "look", "arguments": {"x": 1}}}],
            },
            {"role": "tool", "content": "a cat", "tool_name": "look"},
        ],
        tools=[{"type": "function", "function": {"name": "look"}}],
        format=schema,
    )
    user, assistant, tool = body["messages"]
    assert user["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    assert assistant["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "look", "arguments": '{"x":1}'}}
    ]
    assert tool == {"role": "tool", "content": "a cat", "name": "look"}
    assert body["tools"] == [{"type": "function", "function": {"name": "look"}}]
    assert body["response_format"]["json_schema"]["schema"] == schema


def test_embed_and_legacy_embeddings_become_embeddings() -> None:
    target, body = request("/api/embed", input="one", dimensions=8)
    assert target == b"/v1/embeddings"
    assert body == {
        "model": "smollm2:135m",
        "input": ["one"],
        "encoding_format": "float",
        "dimensions": 8,
    }
    _, body = request("/api/embeddings", prompt="two")
    assert body["input"] == ["two"]


def test_an_empty_prompt_is_answered_here_as_ollama_answers_a_load() -> None:
    translated = ollama_request("/api/generate", b'{"model": "m", "stream": false}', T0)
    assert translated.target == b""
    assert orjson.loads(translated.local or b"") == {
        "model": "m",
        "created_at": "2023-11-14T22:13:20Z",
        "response": "",
        "done": True,
        "done_reason": "load",
    }
    chat = ollama_request("/api/chat", b'{"model": "m", "messages": []}', T0)
    assert chat.local is not None
    assert lines(chat.local)[0]["message"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize(
    ("path", "fields", "message"),
    [
        ("/api/chat", {"messages": "hi"}, "messages must be a list of objects"),
        ("/api/chat", {"messages": [{"content": "x"}]}, "each message needs a role"),
        ("/api/chat", {"messages": [{"role": "user"}], "format": 3}, "format must be"),
        ("/api/chat", {"messages": [{"role": "user"}], "options": []}, "options must be"),
        ("/api/generate", {"prompt": 5}, "prompt must be a string"),
        ("/api/embed", {"input": [1, 2]}, "input must be a string or a list of strings"),
        (
            "/api/chat",
            {"messages": [{"role": "assistant", "tool_calls": ["x"]}]},
            "each tool call needs",
        ),
    ],
)
def test_requests_that_cannot_be_expressed_are_400(
    path: str, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiError, match=message) as raised:
        request(path, **fields)
    assert raised.value.status == 400


def test_show_has_no_openai_counterpart() -> None:
    with pytest.raises(ApiError, match="not available") as raised:
        request("/api/show")
    assert raised.value.status == 501


# -- whole answers -----------------------------------------------------------------------------


def test_a_whole_chat_answer_with_llama_cpp_timings() -> None:
    translated = ollama_request(
        "/api/chat", b'{"model":"m","stream":false,"messages":[{"role":"user"}]}', T0
    )
    answer = AnswerTranslator(translated, arrived=T0, sent=SENT)
    completion = {
        "choices": [
            {"message": {"role": "assistant", "content": "Blue."}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
        "timings": {"prompt_n": 9, "prompt_ms": 20.0, "predicted_n": 3, "predicted_ms": 60.0},
    }
    ollama = orjson.loads(answer.whole(orjson.dumps(completion), SENT + 0.125))
    assert ollama == {
        "model": "m",
        "created_at": "2023-11-14T22:13:20.625Z",
        "message": {"role": "assistant", "content": "Blue."},
        "done": True,
        "done_reason": "length",
        "total_duration": 625_000_000,  # from arrival, the queue included
        "load_duration": 500_000_000,  # Ollama counts the wait for a slot here
        "prompt_eval_count": 9,
        "prompt_eval_duration": 20_000_000,
        "eval_count": 3,
        "eval_duration": 60_000_000,
    }


def test_a_whole_generate_answer_without_timings_counts_its_time_as_decoding() -> None:
    translated = ollama_request("/api/generate", b'{"model":"m","prompt":"x","stream":false}', T0)
    answer = AnswerTranslator(translated, arrived=T0, sent=SENT)
    completion = {
        "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1},
    }
    ollama = orjson.loads(answer.whole(orjson.dumps(completion), SENT + 0.25))
    assert ollama["response"] == "ok"
    assert "message" not in ollama
    assert ollama["eval_duration"] == 250_000_000
    assert "prompt_eval_duration" not in ollama  # zero: omitted as Ollama does


def test_tool_calls_come_back_with_object_arguments() -> None:
    translated = ollama_request(
        "/api/chat", b'{"model":"m","stream":false,"messages":[{"role":"user"}]}', T0
    )
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 2}'}}
    completion = {"choices": [{"message": {"content": None, "tool_calls": [call]}}]}
    answer = AnswerTranslator(translated, T0, SENT)
    message = orjson.loads(answer.whole(orjson.dumps(completion), SENT))["message"]
    assert message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": {"a": 2}}}],
    }


def test_embeddings_come_back_in_order_and_normalised() -> None:
    translated = ollama_request("/api/embed", b'{"model":"e","input":["a","b"]}', T0)
    reply = {
        "data": [{"index": 1, "embedding": [0.0, 2.0]}, {"index": 0, "embedding": [3.0, 4.0]}],
        "usage": {"prompt_tokens": 2},
    }
    answer = AnswerTranslator(translated, T0, SENT)
    ollama = orjson.loads(answer.whole(orjson.dumps(reply), SENT + 0.1))
    assert ollama["embeddings"] == [[0.6, 0.8], [0.0, 1.0]]
    assert all(math.isclose(math.hypot(*v), 1.0) for v in ollama["embeddings"])
    assert ollama["prompt_eval_count"] == 2
    legacy = ollama_request("/api/embeddings", b'{"model":"e","prompt":"a"}', T0)
    single = {"data": [{"index": 0, "embedding": [3.0, 4.0]}]}
    assert orjson.loads(AnswerTranslator(legacy, T0, SENT).whole(orjson.dumps(single), SENT)) == {
        "embedding": [3.0, 4.0]  # the legacy route does not normalise
    }


@pytest.mark.parametrize(
    "body",
    [
        b"<html>",
        b"[1]",
        b'{"choices": []}',
        b'{"data": "x"}',
        b'{"data": [{"x": 1}]}',
        b'{"data": [{"embedding": [0.5, null]}]}',
    ],
)
def test_answers_that_break_the_dialect_are_bad_answers(body: bytes) -> None:
    path = "/api/embed" if b"data" in body else "/api/chat"
    translated = ollama_request(path, b'{"model":"m","input":"a","messages":[{"role":"u"}]}', T0)
    with pytest.raises(BadAnswer):
        AnswerTranslator(translated, T0, SENT).whole(body, SENT)


# -- streams -----------------------------------------------------------------------------------


def chat_stream() -> AnswerTranslator:
    translated = ollama_request("/api/chat", b'{"model":"m","messages":[{"role":"user"}]}', T0)
    return AnswerTranslator(translated, arrived=T0, sent=SENT)


def delta(content: str | None = None, finish: str | None = None, **more: Any) -> dict[str, Any]:
    d: dict[str, Any] = {} if content is None else {"content": content}
    return {"choices": [{"delta": d | more, "finish_reason": finish}]}


def test_a_stream_arriving_in_arbitrary_pieces_becomes_ndjson_chunks() -> None:
    answer = chat_stream()
    wire = sse(
        delta(role="assistant"),  # role only: nothing to show
        delta("Hel"),
        delta("lo"),
        delta(finish="stop"),
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
        b"[DONE]",
    )
    out = b""
    for i in range(0, len(wire), 7):  # split mid-line, mid-CRLF
        out += answer.feed(wire[i : i + 7], SENT + 0.1 + i / 1000)
    assert answer.end(SENT + 1) == b""  # [DONE] already brought the final chunk
    chunks = lines(out)
    assert [c["message"]["content"] for c in chunks] == ["Hel", "lo", ""]
    assert [c["done"] for c in chunks] == [False, False, True]
    final = chunks[-1]
    assert final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (5, 2)
    assert final["load_duration"] == 500_000_000
    assert final["prompt_eval_duration"] > 0
    assert final["eval_duration"] > 0


def test_a_stream_without_usage_counts_its_chunks_and_ends_when_closed() -> None:
    answer = chat_stream()
    out = answer.feed(sse(delta("a"), delta("b"), delta("c", finish="length")), SENT + 0.2)
    out += answer.end(SENT + 0.3)
    final = lines(out)[-1]
    assert final["done"] is True
    assert final["done_reason"] == "length"
    assert final["eval_count"] == 3


def test_comments_and_foreign_events_are_skipped() -> None:
    answer = chat_stream()
    out = answer.feed(
        b": ping\r\n\r\nevent: note\r\ndata: not json\r\n\r\n" + sse(delta("x")), SENT
    )
    assert [c["message"]["content"] for c in lines(out)] == ["x"]


def test_streamed_tool_calls_are_assembled_whole() -> None:
    answer = chat_stream()
    first = {"index": 0, "id": "c", "function": {"name": "get_", "arguments": '{"ci'}}
    rest = {"index": 0, "function": {"name": "weather", "arguments": 'ty": "Oslo"}'}}
    out = answer.feed(
        sse(delta(tool_calls=[first]), delta(tool_calls=[rest]), delta(finish="tool_calls"))
        + sse(b"[DONE]"),
        SENT,
    )
    calls, final = lines(out)
    assert calls["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    assert final["done"] is True


def test_an_error_event_ends_the_stream_with_ollamas_error_line() -> None:
    answer = chat_stream()
    out = answer.feed(sse(delta("a"), {"error": {"message": "context full", "code": 500}}), SENT)
    out += answer.feed(sse(delta("after")), SENT)
    assert lines(out)[-1] == {"error": "context full"}
    assert answer.end(SENT) == b""


def test_generate_streams_carry_response_not_message() -> None:
    translated = ollama_request("/api/generate", b'{"model":"m","prompt":"p"}', T0)
    answer = AnswerTranslator(translated, T0, SENT)
    out = answer.feed(sse(delta("x"), b"[DONE]"), SENT)
    assert [c["response"] for c in lines(out)] == ["x", ""]
    raw = ollama_request("/api/generate", b'{"model":"m","prompt":"p","raw":true}', T0)
    completion_chunk = {"choices": [{"text": "y", "finish_reason": None}]}
    out = AnswerTranslator(raw, T0, SENT).feed(sse(completion_chunk), SENT)
    assert lines(out)[0]["response"] == "y"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "no such model", "type": "not_found_error"}}', "no such model"),
        (b'{"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}', "bad"),
        (b'{"error": "plain"}', "plain"),
        (
            b'{"detail": [{"msg": "Field required"}, {"msg": "too long"}]}',
            "Field required; too long",
        ),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b"Internal Server Error", "Internal Server Error"),
        (b"", "no message"),
    ],
)
def test_engine_errors_become_ollama_messages(body: bytes, message: str) -> None:
    assert error_message(body) == message


def test_fastapis_422_is_ollamas_400() -> None:
    assert [ollama_status(s) for s in (200, 404, 422, 500)] == [200, 404, 400, 500]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_think_reaches_an_openai_dialect_engine_as_llama_server_and_vllm_take_it(
    path: str,
) -> None:
    asked = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    _, off = request(path, think=False, **asked)
    _, on = request(path, think=True, **asked)
    _, high = request(path, think="high", **asked)
    _, unsaid = request(path, **asked)
    assert off["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning_effort" not in off
    assert on["chat_template_kwargs"] == {"enable_thinking": True}
    assert high["reasoning_effort"] == "high"  # vLLM's and OpenAI's field (gpt-oss levels)
    assert high["chat_template_kwargs"] == {"enable_thinking": True, "reasoning_effort": "high"}
    assert "chat_template_kwargs" not in unsaid and "reasoning_effort" not in unsaid
    with pytest.raises(ApiError, match="think") as refused:
        request(path, think="extreme", **asked)
    assert refused.value.status == 400


def test_thinking_in_the_history_goes_back_as_reasoning_content() -> None:
    history = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "thinking": "two and two make four"},
        {"role": "user", "content": "and 3+3?"},
    ]
    _, sent = request("/api/chat", messages=history)
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": "4",
        "reasoning_content": "two and two make four",
    }
    assert "reasoning_content" not in sent["messages"][0]
