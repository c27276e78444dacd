"""What the gateway reads from a request before queueing it."""

from __future__ import annotations

import orjson
import pytest

from parallama.errors import ApiError
from parallama.protocol.inspect import RequestInfo, error_body, inspect_request, with_pins
from parallama.protocol.ollama import name_parts, name_too_long


def info(
    path: str, body: object, headers: dict[str, str] | None = None, remote: str = "10.0.0.9"
) -> RequestInfo:
    return inspect_request(path, orjson.dumps(body), headers or {}, remote)


@pytest.mark.parametrize(
    ("path", "dialect", "stream"),
    [
        ("/api/chat", "ollama", True),
        ("/api/generate", "ollama", True),
        ("/api/embed", "ollama", False),
        ("/v1/chat/completions", "openai", False),
        ("/v1/completions", "openai", False),
        ("/v1/embeddings", "openai", False),
    ],
)
def test_stream_defaults_per_dialect(path: str, dialect: str, stream: bool) -> None:
    seen = info(path, {"model": "m"})
    assert (seen.dialect, seen.model, seen.stream) == (dialect, "m", stream)
    assert info(path, {"model": "m", "stream": not stream}).stream is (not stream)
    assert info(path, {"model": "m", "stream": None}).stream is stream


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "missing request body"),
        (b"{", "invalid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"prompt": "x"}', "model is required"),
        (b'{"model": ""}', "model is required"),
        (b'{"model": 3}', "model is required"),
        (b'{"model": "m", "stream": "yes"}', "stream must be true or false"),
    ],
)
def test_bad_bodies(body: bytes, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        inspect_request("/api/chat", body, {}, "127.0.0.1")
    assert caught.value.status == 400
    assert message in caught.value.message


def test_show_accepts_the_old_name_field() -> None:
    assert info("/api/show", {"name": "m"}).model == "m"


def test_client_identity_never_holds_the_key() -> None:
    keyed = info(
        "/api/chat", {"model": "m"}, {"Authorization": "Bearer sk-secret", "X-Client-Id": "x"}
    )
    assert keyed.client.startswith("key:")
    assert "sk-secret" not in keyed.client
    assert (
        keyed.client
        == info("/api/chat", {"model": "m"}, {"Authorization": "Bearer sk-secret"}).client
    )
    assert info("/api/chat", {"model": "m"}, {"X-Client-Id": "team-a"}).client == "id:team-a"
    assert info("/api/chat", {"model": "m"}).client == "addr:10.0.0.9"


def test_priority_header() -> None:
    assert info("/api/chat", {"model": "m"}, {"X-Priority": "5"}).priority == 5
    assert info("/api/chat", {"model": "m"}).priority == 0
    for bad in ("high", "11"):
        with pytest.raises(ApiError):
            info("/api/chat", {"model": "m"}, {"X-Priority": bad})


def test_errors_in_each_dialect() -> None:
    assert orjson.loads(error_body("ollama", 400, "model is required")) == {
        "error": "model is required"
    }
    openai_error = orjson.loads(error_body("openai", 400, "model is required"))["error"]
    assert openai_error["type"] == "invalid_request_error"
    assert openai_error["message"] == "model is required"


def test_a_conversation_keeps_its_session_as_it_grows_and_never_shows_its_text() -> None:
    system = {"role": "system", "content": "You are terse."}
    first = {"role": "user", "content": "secret plan"}
    turn1 = info("/api/chat", {"model": "m", "messages": [system, first]})
    later = [
        system,
        first,
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "?"},
    ]
    turn2 = info("/api/chat", {"model": "m", "messages": later})
    other_client = info("/api/chat", {"model": "m", "messages": [system, first]}, remote="10.0.0.8")
    other_chat = info(
        "/api/chat", {"model": "m", "messages": [system, {"role": "user", "content": "x"}]}
    )
    assert turn1.session == turn2.session
    assert turn1.session.startswith("conv:")
    assert "secret" not in turn1.session
    assert len({turn1.session, other_client.session, other_chat.session}) == 3
    named = info("/api/chat", {"model": "m", "messages": later}, {"X-Session-Id": " s-42 "})
    assert named.session == "id:s-42"
    prompt = info("/api/generate", {"model": "m", "prompt": "a" * 300})
    assert (
        prompt.session == info("/api/generate", {"model": "m", "prompt": "a" * 256 + "b"}).session
    )
    assert info("/api/embed", {"model": "m", "input": "x"}).session == "addr:10.0.0.9"


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("qwen2.5:7b", {"host": "", "namespace": "", "model": "qwen2.5", "tag": "7b"}),
        ("library/llama3", {"host": "", "namespace": "library", "model": "llama3", "tag": ""}),
        (
            "registry.local:5000/team/coder:q4",
            {"host": "registry.local:5000", "namespace": "team", "model": "coder", "tag": "q4"},
        ),
        ("a.b/c/d/e", {"host": "a.b/c", "namespace": "d", "model": "e", "tag": ""}),
    ],
)
def test_model_names_are_cut_into_parts_as_ollama_cuts_them(name: str, parts: object) -> None:
    assert name_parts(name) == parts


def test_names_past_ollamas_part_limits_are_refused_and_the_longest_valid_one_passes() -> None:
    longest = f"{'h' * 350}/{'n' * 80}/{'m' * 80}:{'t' * 80}"
    assert len(longest) == 593 and name_too_long(longest) is None
    assert info("/api/chat", {"model": longest}).model == longest
    for too_long in (f"{'m' * 81}:7b", f"qwen:{'t' * 81}", f"{'n' * 81}/m", f"{'h' * 351}/n/m"):
        with pytest.raises(ApiError, match=r"^invalid model name: its .* part is") as refused:
            info("/api/chat", {"model": too_long})
        assert refused.value.status == 400
    assert name_too_long("/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf") is None  # a llama.cpp path
    assert name_too_long("https://" + longest) is None  # the scheme is no part of the host
    assert name_too_long("a" * 100_000 + "://m") == "its scheme is 100000 bytes, more than 16"
    assert info("/api/chat", {"model": " " * 100_000 + "qwen:7b\n"}).model == "qwen:7b"


def test_pinned_options_and_keep_alive_replace_the_clients_and_keep_the_rest() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "prompt": "hi",
            "keep_alive": 0,
            "options": {"num_ctx": 2048, "temperature": 0.2},
            "OPTIONS": {"num_batch": 8},  # Go's decoder would read this one too
        }
    )
    pinned = orjson.loads(
        with_pins(body, "m", keep_alive="30m", options={"num_ctx": 8192}, strict=False)
    )
    assert pinned == {
        "model": "m",
        "prompt": "hi",
        "keep_alive": "30m",
        "options": {"num_ctx": 8192, "temperature": 0.2, "num_batch": 8},
    }


def test_unpinned_keep_alive_is_the_clients_and_strict_refuses_a_differing_option() -> None:
    body = orjson.dumps({"model": "m", "Keep_Alive": "1m", "options": {"num_ctx": 2048}})
    kept = orjson.loads(with_pins(body, "m", keep_alive=None, options={}, strict=False))
    assert kept["keep_alive"] == "1m" and kept["options"] == {"num_ctx": 2048}
    with pytest.raises(ApiError, match=r"runs with num_ctx = 8192") as refused:
        with_pins(body, "m", keep_alive=None, options={"num_ctx": 8192}, strict=True)
    assert refused.value.status == 400
    same = orjson.dumps({"model": "m", "options": {"num_ctx": 8192}})
    sent = with_pins(same, "m", keep_alive=None, options={"num_ctx": 8192}, strict=True)
    assert orjson.loads(sent)["options"] == {"num_ctx": 8192}  # the same value: no refusal
