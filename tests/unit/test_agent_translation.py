"""The Anthropic Messages and Responses APIs in front of a chat-completions engine (sans-I/O):
requests one way, answers (whole and streamed, cut anywhere) the other."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from parallama.core.prefixes import prefix_blocks, shared_blocks
from parallama.errors import ApiError
from parallama.protocol import anthropic, inspect, ollama, responses
from parallama.protocol.anthropic import MessagesAnswer
from parallama.protocol.responses import ResponsesAnswer
from parallama.protocol.sse import EventReader, EventTooLarge
from parallama.protocol.usage import usage_from_tail


def chat_of(raw: bytes) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(raw)
    return value


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 7}}
TOOL_STREAM = sse(
    chunk({"role": "assistant", "content": "Let me look."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "get_weather"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({}, "tool_calls"),
    USAGE,
)


def events_of(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    reader = EventReader()
    return [(name.decode(), orjson.loads(data)) for name, data in reader.feed(stream)]


# -- Anthropic: requests ---------------------------------------------------------------------------


def test_a_messages_request_becomes_chat_messages_in_the_engines_order() -> None:
    body, stream = anthropic.chat_request(
        {
            "model": "m",
            "max_tokens": 100,
            "stream": True,
            "system": [{"type": "text", "text": "You are terse."}],
            "stop_sequences": ["END"],
            "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "thinking": {"type": "enabled", "budget_tokens": 8000},
            "messages": [
                {"role": "user", "content": "call f"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "I should call f.", "signature": "x"},
                        {"type": "text", "text": "Calling."},
                        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"},
                        {"type": "text", "text": "and now?"},
                    ],
                },
            ],
        }
    )
    chat = chat_of(body)
    assert stream
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["max_tokens"] == 100
    assert chat["stop"] == ["END"]
    assert chat["tool_choice"] == "required"
    assert chat["parallel_tool_calls"] is False
    assert chat["reasoning_effort"] == "medium"
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
        }
    ]
    assert chat["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "call f"},
        {
            "role": "assistant",
            "content": "Calling.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a":1}'},
                }
            ],
            "reasoning_content": "I should call f.",
        },
        # The result first: it answers the call of the message before.
        {"role": "tool", "tool_call_id": "toolu_1", "content": "42"},
        {"role": "user", "content": "and now?"},
    ]


def test_images_become_data_url_parts() -> None:
    source = {"type": "base64", "media_type": "image/png", "data": "iVBOR"}
    body, _ = anthropic.chat_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": source}, {"type": "text", "text": "?"}],
                }
            ],
        }
    )
    [message] = chat_of(body)["messages"]
    assert message["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
        {"type": "text", "text": "?"},
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"messages": "hi"},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
        {"messages": [], "tools": ["web_search"]},
    ],
)
def test_what_a_chat_engine_cannot_do_is_a_400(data: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        anthropic.chat_request({"model": "m", **data})
    assert refused.value.status == 400


# -- Anthropic: answers ----------------------------------------------------------------------------


def test_a_whole_answer_becomes_a_message() -> None:
    answer = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "Sure.",
                    "tool_calls": [
                        {"id": "c1", "function": {"name": "f", "arguments": '{"x": "y"}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
    }
    message = orjson.loads(MessagesAnswer("m", stream=False).whole(orjson.dumps(answer)))
    assert message["id"].startswith("msg_")
    assert message["model"] == "m"
    assert message["content"] == [
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": "y"}},
    ]
    assert message["stop_reason"] == "tool_use"
    # Anthropic counts the cached part of the prompt apart.
    assert message["usage"] == {"input_tokens": 4, "output_tokens": 5, "cache_read_input_tokens": 8}


@pytest.mark.parametrize("cut", [1, 7, 64, 10_000])
def test_a_stream_becomes_anthropics_events_however_it_is_cut(cut: int) -> None:
    translator = MessagesAnswer("m", stream=True)
    out = b"".join(
        translator.feed(TOOL_STREAM[i : i + cut]) for i in range(0, len(TOOL_STREAM), cut)
    )
    out += translator.end()
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert events[4][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
    }
    fragments = "".join(
        d["delta"]["partial_json"] for n, d in events if d.get("index") == 1 and n.endswith("delta")
    )
    assert orjson.loads(fragments) == {"city": "Paris"}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"input_tokens": 30, "output_tokens": 7}


def test_nothing_is_said_before_the_engines_first_piece() -> None:
    """A stream that told the client nothing can still fail over to another backend."""
    translator = MessagesAnswer("m", stream=True)
    assert translator.feed(b": keep-alive\n\n") == b""
    assert translator.feed(sse(chunk({"role": "assistant"}))[:-14]) == b""


def test_an_engines_error_in_its_stream_is_anthropics_error_event() -> None:
    translator = MessagesAnswer("m", stream=True)
    out = translator.feed(sse(chunk({"content": "Hi"}), {"error": {"message": "out of memory"}}))
    events = events_of(out + translator.end())
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "out of memory"}},
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
    ],
)
def test_anthropic_error_types(status: int, kind: str) -> None:
    assert orjson.loads(anthropic.error_body(status, "m")) == {
        "type": "error",
        "error": {"type": kind, "message": "m"},
    }


# -- the Responses API ---------------------------------------------------------------------------


def test_a_responses_request_becomes_chat_messages() -> None:
    body, stream = responses.chat_request(
        {
            "model": "m",
            "instructions": "Be terse.",
            "max_output_tokens": 50,
            "reasoning": {"effort": "low"},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "required",
            "input": [
                {"role": "developer", "content": "Project rules."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "go"}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "zz"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "two"}],
                },
            ],
        }
    )
    chat = chat_of(body)
    assert not stream
    assert chat["max_tokens"] == 50
    assert chat["reasoning_effort"] == "low"
    assert chat["tool_choice"] == "required"
    calls = [
        {"id": c, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for c in ("c1", "c2")
    ]
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "system", "content": "Project rules."},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": calls},  # one turn's calls: one message
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_hosted_tools_are_left_out_and_namespaces_expanded() -> None:
    """What Codex offers every model: a web search (OpenAI's service) and namespaced tools."""
    body, _ = responses.chat_request(
        {
            "model": "m",
            "input": "hi",
            "tools": [
                {"type": "web_search"},
                {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
                {
                    "type": "namespace",
                    "name": "multi_agent_v1",
                    "tools": [{"type": "function", "name": "spawn", "description": "d"}],
                },
            ],
        }
    )
    names = [t["function"]["name"] for t in chat_of(body)["tools"]]
    assert names == ["exec_command", "multi_agent_v1.spawn"]
    server_tool = {"type": "web_search_20250305", "name": "web_search"}
    messages_body, _ = anthropic.chat_request(
        {"model": "m", "messages": [], "tools": [server_tool]}
    )
    assert "tools" not in chat_of(messages_body)


@pytest.mark.parametrize(
    "data",
    [
        {"input": "hi", "previous_response_id": "resp_1"},
        {"input": "hi", "tools": "web_search"},
        {"input": [{"type": "computer_call"}]},
        {"input": 3},
    ],
)
def test_what_a_stateless_chat_engine_cannot_do_is_a_400(data: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        responses.chat_request({"model": "m", **data})
    assert refused.value.status == 400


@pytest.mark.parametrize("cut", [3, 50, 10_000])
def test_a_stream_becomes_numbered_responses_events(cut: int) -> None:
    translator = ResponsesAnswer("m", {"input": "x"}, stream=True)
    out = b"".join(
        translator.feed(TOOL_STREAM[i : i + cut]) for i in range(0, len(TOOL_STREAM), cut)
    )
    events = events_of(out + translator.end())
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert final["status"] == "completed"
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == '{"city": "Paris"}'
    assert final["output"][1]["call_id"] == "call_1"
    assert final["usage"]["total_tokens"] == 37


def test_an_answer_cut_at_its_length_is_incomplete() -> None:
    answer = {"choices": [{"message": {"content": "Half"}, "finish_reason": "length"}]}
    response = orjson.loads(ResponsesAnswer("m", {}, stream=False).whole(orjson.dumps(answer)))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["content"][0]["text"] == "Half"


# -- the pieces around them ------------------------------------------------------------------------


def test_usage_is_read_from_each_apis_counts() -> None:
    start = (
        b'{"type":"message_start","message":{"usage":'
        b'{"input_tokens":5,"cache_read_input_tokens":100,"output_tokens":1}}}'
    )
    delta = b'{"type":"message_delta","usage":{"output_tokens":42}}'
    usage = usage_from_tail(start + delta)
    assert usage is not None
    assert (usage.prompt_tokens, usage.generated_tokens) == (105, 42)
    responses_usage = usage_from_tail(
        b'"usage":{"input_tokens":9,"output_tokens":3,"total_tokens":12}'
    )
    assert responses_usage is not None
    assert (responses_usage.prompt_tokens, responses_usage.generated_tokens) == (9, 3)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("0.14.2", (0, 14, 2)),
        ("v0.9.0", (0, 9, 0)),
        ("0.15.0-rc1", (0, 15, 0)),
        ("0.1", None),
        ("x.y.z", None),
        (3, None),
        ("1" * 20 + ".0.0", None),
    ],
)
def test_ollama_versions(text: Any, version: tuple[int, int, int] | None) -> None:
    assert ollama.parse_version(text) == version


def test_which_routes_each_ollama_release_has() -> None:
    assert ollama.routes_since((0, 12, 0)) == frozenset()
    assert ollama.routes_since((0, 13, 3)) == {"/v1/responses"}
    assert ollama.routes_since((0, 14, 0)) == {"/v1/responses", "/v1/messages"}


def test_an_event_reader_is_bounded() -> None:
    reader = EventReader(limit=1024)
    with pytest.raises(EventTooLarge):
        reader.feed(b"data: " + b"x" * 2048)
    assert EventReader().feed(b"event: a\ndata: 1\ndata: 2\n\n: comment\n\n") == [(b"a", b"1\n2")]


@pytest.mark.parametrize(
    ("path", "system", "turns"),
    [("/v1/messages", "system", "messages"), ("/v1/responses", "instructions", "input")],
)
def test_prefix_affinity_hashes_the_system_prompt_the_tools_then_the_turns(
    path: str, system: str, turns: str
) -> None:
    """A session's next turn shares all its earlier prompt's blocks; another system prompt
    shares none."""
    tools = [{"name": "read_file", "description": "Reads a file. " * 40}]
    first = {
        system: "You are a coding agent. " * 40,
        "tools": tools,
        turns: [{"role": "user", "content": "go"}],
    }
    later = {**first, turns: [*first[turns], {"role": "assistant", "content": "done"}]}
    other = {**first, system: "You are another agent. " * 40}
    blocks = [prefix_blocks("m", inspect.prompt_material(path, d)) for d in (first, later, other)]
    assert len(blocks[0]) >= 5
    assert shared_blocks(blocks[0], blocks[1]) >= len(blocks[0]) - 1
    assert shared_blocks(blocks[0], blocks[2]) == 0
