"""Bad input gets Ollama's status codes and error bodies, in each route's own dialect."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from parallama.sim.server import SimServer
from tests.simhelpers import CHAT_MODEL, EMBED_MODEL


@pytest.fixture(scope="module")
def http(sim: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        yield client


def post_raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/show"])
def test_empty_body(http: httpx.Client, path: str) -> None:
    response = post_raw(http, path, b"")
    assert response.status_code == 400
    assert response.json() == {"error": "missing request body"}


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed"])
def test_malformed_json(http: httpx.Client, path: str) -> None:
    response = post_raw(http, path, b'{"model": ')
    assert response.status_code == 400
    assert response.json()["error"]


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/show"])
def test_missing_model(http: httpx.Client, path: str) -> None:
    response = http.post(path, json={"prompt": "hi"})
    assert response.status_code == 400
    assert response.json() == {"error": "model is required"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "ghost", "prompt": "hi"}),
        ("/api/chat", {"model": "ghost", "messages": []}),
        ("/api/embed", {"model": "ghost", "input": "x"}),
        ("/api/show", {"model": "ghost"}),
    ],
)
def test_unknown_model(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 404
    assert response.json() == {"error": "model 'ghost' not found"}


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/show"])
def test_a_model_name_past_ollamas_length_limits_is_invalid(http: httpx.Client, path: str) -> None:
    response = http.post(path, json={"model": "m" * 81, "prompt": "hi", "input": "x"})
    assert response.status_code == 400
    assert response.json() == {"error": "invalid model name"}


def test_wrong_field_type_names_the_field(http: httpx.Client) -> None:
    response = http.post("/api/generate", json={"model": CHAT_MODEL, "prompt": 42})
    assert response.status_code == 400
    assert "GenerateRequest.prompt" in response.json()["error"]


def test_invalid_keep_alive(http: httpx.Client) -> None:
    response = http.post(
        "/api/generate", json={"model": CHAT_MODEL, "prompt": "x", "keep_alive": "soon"}
    )
    assert response.status_code == 400
    assert "invalid duration" in response.json()["error"]


def test_embedding_model_cannot_generate(http: httpx.Client) -> None:
    response = http.post("/api/generate", json={"model": EMBED_MODEL, "prompt": "hi"})
    assert response.status_code == 400
    assert response.json() == {"error": f'"{EMBED_MODEL}" does not support generate'}


def test_raw_mode_and_thinking_are_refused_as_ollama_does(http: httpx.Client) -> None:
    raw = http.post(
        "/api/generate", json={"model": CHAT_MODEL, "prompt": "x", "raw": True, "system": "s"}
    )
    assert raw.status_code == 400
    assert raw.json() == {"error": "raw mode does not support template, system, or context"}
    think = http.post("/api/chat", json={"model": CHAT_MODEL, "messages": [], "think": True})
    assert think.status_code == 400
    assert think.json() == {"error": f'"{CHAT_MODEL}" does not support thinking'}


def test_unknown_path_and_wrong_method_are_plain_text(http: httpx.Client) -> None:
    missing = http.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    wrong = http.get("/api/chat")
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")


def test_foreign_host_header_is_refused_like_ollama(http: httpx.Client) -> None:
    """Ollama on loopback answers 403 with an empty body to a non-local Host (DNS rebinding)."""
    refused = http.get("/api/tags", headers={"Host": "attacker.example.com"})
    assert (refused.status_code, refused.content) == (403, b"")
    assert http.get("/api/tags", headers={"Host": "localhost:11434"}).status_code == 200


def test_head_and_root(http: httpx.Client) -> None:
    assert http.get("/").text == "Ollama is running"
    head = http.head("/")
    assert head.status_code == 200


def test_openai_errors_use_the_openai_object(http: httpx.Client) -> None:
    bad = post_raw(http, "/v1/chat/completions", b"not json")
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    missing = http.post(
        "/v1/chat/completions",
        json={"model": "ghost", "messages": [{"role": "user", "content": "x"}]},
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    empty = http.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": []})
    assert empty.status_code == 400


def test_oversized_body_is_413(http: httpx.Client) -> None:
    response = post_raw(
        http, "/api/embed", b'{"model": "x", "input": "' + b"a" * (65 * 1024 * 1024) + b'"}'
    )
    assert response.status_code == 413
    assert response.json() == {"error": "request body too large"}


def test_dimensions_truncate_and_renormalise(http: httpx.Client) -> None:
    response = http.post("/api/embed", json={"model": EMBED_MODEL, "input": "x", "dimensions": 64})
    vector = response.json()["embeddings"][0]
    assert len(vector) == 64
    assert sum(v * v for v in vector) == pytest.approx(1.0)
    too_many = http.post(
        "/api/embed", json={"model": EMBED_MODEL, "input": "x", "dimensions": 100_000}
    )
    assert too_many.status_code == 400


def test_server_keeps_serving_after_errors(http: httpx.Client) -> None:
    ok = http.post(
        "/api/generate", json={"model": CHAT_MODEL, "prompt": "still there?", "stream": False}
    )
    assert ok.status_code == 200
    assert ok.json()["done"] is True
