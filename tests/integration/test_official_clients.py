"""The official `ollama` and `openai` Python packages, used as real clients against the emulator."""

from __future__ import annotations

import math
from collections.abc import Iterator

import ollama
import openai
import pytest

from parallama.sim.server import SimServer
from tests.simhelpers import CHAT_MODEL, EMBED_MODEL, sim_server


@pytest.fixture(scope="module")
def server() -> Iterator[SimServer]:
    with sim_server(output_tokens=(12, 20)) as running:
        yield running


@pytest.fixture
def client(server: SimServer) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture
def oai(server: SimServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="ollama", max_retries=0)


def test_list_show_and_version(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert CHAT_MODEL in names
    assert EMBED_MODEL in names
    shown = client.show(CHAT_MODEL)
    assert shown.details is not None
    assert shown.details.family == "qwen2"
    assert shown.capabilities == ["completion", "tools"]


def test_generate_streaming_matches_final_statistics(client: ollama.Client) -> None:
    chunks = list(client.generate(model=CHAT_MODEL, prompt="Why is the sky blue?", stream=True))
    *parts, last = chunks
    assert parts and all(not c.done for c in parts)
    assert last.done
    assert last.done_reason == "stop"
    text = "".join(c.response or "" for c in parts)
    assert text.strip()
    assert last.eval_count == len(parts)
    assert last.prompt_eval_count and last.prompt_eval_count > 0
    assert last.total_duration and last.eval_duration
    assert last.total_duration >= last.eval_duration
    assert last.context and len(last.context) == last.prompt_eval_count + last.eval_count


def test_generate_is_deterministic_and_num_predict_cuts(client: ollama.Client) -> None:
    first = client.generate(model=CHAT_MODEL, prompt="Tell me about queues.")
    again = client.generate(model=CHAT_MODEL, prompt="Tell me about queues.")
    assert first.response == again.response
    cut = client.generate(
        model=CHAT_MODEL, prompt="Tell me about queues.", options={"num_predict": 3}
    )
    assert cut.done_reason == "length"
    assert cut.eval_count == 3
    assert first.response
    assert cut.response
    assert first.response.startswith(cut.response)


def test_chat_streaming_and_not(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Explain batching."}]
    whole = client.chat(model=CHAT_MODEL, messages=messages)
    assert whole.message.role == "assistant"
    assert whole.done and whole.done_reason == "stop"
    streamed = list(client.chat(model=CHAT_MODEL, messages=messages, stream=True))
    assert "".join(c.message.content or "" for c in streamed) == whole.message.content
    assert streamed[-1].eval_count == whole.eval_count


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    result = client.embed(model=EMBED_MODEL, input=["first text", "second text"])
    assert len(result.embeddings) == 2
    assert all(len(v) == 768 for v in result.embeddings)
    assert math.isclose(math.fsum(x * x for x in result.embeddings[0]), 1.0, rel_tol=1e-9)
    assert result.embeddings[0] != result.embeddings[1]
    again = client.embed(model=EMBED_MODEL, input="first text")
    assert again.embeddings[0] == result.embeddings[0]
    legacy = client.embeddings(model=EMBED_MODEL, prompt="first text")
    assert list(legacy.embedding) == result.embeddings[0]


def test_unknown_model_is_404_for_the_client(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'no-such-model' not found"


def test_ps_lists_the_loaded_model(client: ollama.Client) -> None:
    client.generate(model=CHAT_MODEL, prompt="warm up")
    loaded = client.ps().models
    assert CHAT_MODEL in [m.model for m in loaded]
    entry = next(m for m in loaded if m.model == CHAT_MODEL)
    assert entry.expires_at is not None
    assert entry.size_vram and entry.size_vram > 0


def test_openai_chat_non_streaming(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say something."}]
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_chat_streaming_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Say something."}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == 5


def test_openai_completions_and_models(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model=CHAT_MODEL, prompt="Once upon a time", max_tokens=4)
    assert done.object == "text_completion"
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 4
    pieces = list(
        oai.completions.create(
            model=CHAT_MODEL, prompt="Once upon a time", max_tokens=4, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == done.choices[0].text
    assert {m.id for m in oai.models.list()} >= {CHAT_MODEL, EMBED_MODEL}
    assert oai.models.retrieve(CHAT_MODEL).id == CHAT_MODEL


def test_openai_embeddings_float_and_base64(oai: openai.OpenAI, client: ollama.Client) -> None:
    native = client.embed(model=EMBED_MODEL, input="hello").embeddings[0]
    as_float = oai.embeddings.create(model=EMBED_MODEL, input="hello", encoding_format="float")
    assert as_float.data[0].embedding == native
    default = oai.embeddings.create(
        model=EMBED_MODEL, input=["hello"]
    )  # the client asks for base64
    assert default.data[0].embedding == pytest.approx(native, abs=1e-6)


def test_openai_errors_are_typed(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert "model 'missing' not found" in str(caught.value.message)
