"""The timing model, the generated text and Go durations: pure functions with exact answers."""

from __future__ import annotations

import math
import random

import pytest

from parallama.protocol.durations import (
    FOREVER,
    DurationError,
    env_keep_alive_seconds,
    keep_alive_seconds,
    parse_go_duration,
)
from parallama.protocol.hosts import host_allowed, local_host, loopback_only
from parallama.protocol.ollama import final_statistics, normalize_name, rfc3339
from parallama.sim.answers import chat_prompt, plan_answer
from parallama.sim.catalog import spec_for
from parallama.sim.text import count_tokens, embedding, generate_tokens
from parallama.sim.timing import PROFILES, TimingModel


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("300ms", 0.3),
        ("1.5h", 5400),
        ("0", 0),
        ("-1s", -1),
        ("2h3m4s", 7384),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "abc", "5x", "m5"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_go_duration(text)


def test_keep_alive_values() -> None:
    assert keep_alive_seconds(30) == 30
    assert keep_alive_seconds("10m") == 600
    assert keep_alive_seconds(-1) == FOREVER
    assert keep_alive_seconds("-1m") == FOREVER
    assert keep_alive_seconds(0) == 0
    with pytest.raises(DurationError):
        keep_alive_seconds(True)
    assert env_keep_alive_seconds("3600") == 3600  # OLLAMA_KEEP_ALIVE also takes plain seconds
    assert env_keep_alive_seconds("-1") == FOREVER


def test_timing_shape_matches_real_batching() -> None:
    """Aggregate throughput rises and flattens with more slots; per-sequence speed falls."""
    model = TimingModel(prefill_tps=1000, decode_tps=50, batch_slowdown=0.6)
    assert model.aggregate_tps(1) == pytest.approx(50)
    assert model.aggregate_tps(4) / model.aggregate_tps(1) == pytest.approx(4 / 2.8)
    assert 1.4 <= model.aggregate_tps(4) / 50 <= 1.6
    assert model.aggregate_tps(8) > model.aggregate_tps(4)
    assert model.token_seconds(4) > model.token_seconds(1)
    assert model.prefill_seconds(100, 1) == pytest.approx(0.1)


def test_profiles_reproduce_the_seed_tokens_per_second() -> None:
    seed_table = {
        "m2-8gb": 15,
        "m2-16gb": 25,
        "m2-pro-32gb": 20,
        "rtx3090": 80,
        "rtx4090": 55,
        "2x-rtx4090": 35,
    }
    for name, tps in seed_table.items():
        assert 1 / PROFILES[name].timing.token_seconds(1) == pytest.approx(tps)


def test_bad_timing_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimingModel(prefill_tps=0, decode_tps=10)


def test_token_count_matches_generated_tokens() -> None:
    for seed in range(20):
        tokens = generate_tokens(random.Random(seed), "How do queues work under load?", 57)
        assert len(tokens) == 57
        assert count_tokens("".join(tokens)) == 57


def test_answers_are_deterministic_and_cut_by_num_predict() -> None:
    args = {
        "model": "m",
        "prompt": "hello",
        "request_seed": None,
        "server_seed": 0,
        "length_range": (30, 30),
    }
    full = plan_answer(num_predict=None, **args)  # type: ignore[arg-type]
    assert full == plan_answer(num_predict=None, **args)  # type: ignore[arg-type]
    assert full.done_reason == "stop"
    cut = plan_answer(num_predict=10, **args)  # type: ignore[arg-type]
    assert cut.done_reason == "length"
    assert len(cut.tokens) == 10
    other = plan_answer(num_predict=None, **{**args, "prompt": "goodbye"})  # type: ignore[arg-type]
    assert other.text != full.text


def test_chat_prompt_counts_template_overhead() -> None:
    text, tokens = chat_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    )
    assert "Be brief." in text
    assert len(tokens) == (3 + 4) + (2 + 4) + 3  # the messages, then the assistant's turn
    assert tokens[:7] == ("<|start|>", "system", "\n", "Be", "brief", ".", "<|end|>")


def test_embeddings_are_normalised_and_stable() -> None:
    vector = embedding("nomic-embed-text:latest", "text", 768)
    assert len(vector) == 768
    assert math.fsum(x * x for x in vector) == pytest.approx(1.0)
    assert vector == embedding("nomic-embed-text:latest", "text", 768)
    assert vector != embedding("nomic-embed-text:latest", "other", 768)


def test_model_names_resolve_like_ollama() -> None:
    assert normalize_name("nomic-embed-text") == "nomic-embed-text:latest"
    assert normalize_name("qwen2.5:7b") == "qwen2.5:7b"
    assert (
        normalize_name("registry.local:5000/team/model") == "registry.local:5000/team/model:latest"
    )
    made_up = spec_for("mistral:13b")
    assert made_up.parameter_size == "13B"
    assert not made_up.is_embedding
    assert spec_for("my-embed-model").is_embedding


def test_wire_helpers() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1.5) == "1970-01-01T00:00:01.5Z"
    stats = final_statistics(
        total=1.0, load=0.0, prompt_eval_count=3, prompt_eval=0.1, eval_count=5, eval_=0.5
    )
    assert stats == {
        "total_duration": 1_000_000_000,
        "prompt_eval_count": 3,
        "prompt_eval_duration": 100_000_000,
        "eval_count": 5,
        "eval_duration": 500_000_000,
    }


@pytest.mark.parametrize(
    ("bound", "header", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1:11434", True),
        ("127.0.0.1", "localhost:11434", True),
        ("127.0.0.1", "[::1]:11434", True),
        ("127.0.0.1", "192.168.1.5:11434", True),
        ("127.0.0.1", "gpu-box.local", True),
        ("127.0.0.1", "myhost", True),
        ("127.0.0.1", "evil.example.com", False),
        ("127.0.0.1", "8.8.8.8", False),
        ("127.0.0.1", "198.18.0.1", False),  # Python's is_private says yes; Go's, Ollama's, no
        ("127.0.0.1", "[2001:db8::1]:11434", False),
        ("127.0.0.1", "[::ffff:10.1.2.3]", True),
        ("127.0.0.1", "[fd00::5]:11434", True),
        ("0.0.0.0", "evil.example.com", True),
    ],
)
def test_ollama_host_guard(bound: str, header: str, allowed: bool) -> None:
    assert host_allowed(bound, header, hostname="myhost") is allowed


@pytest.mark.parametrize(
    ("header", "allowed", "served"),
    [
        ("llm.example.com:443", ("llm.example.com",), True),
        ("LLM.Example.com", ("llm.example.com",), True),
        ("a.corp.example", (".corp.example",), True),
        ("corp.example", (".corp.example",), True),
        ("evilcorp.example", (".corp.example",), False),
        ("anything.example", ("*",), True),
        ("other.example", ("llm.example.com",), False),
    ],
)
def test_allowed_hosts_add_names_to_the_local_ones(
    header: str, allowed: tuple[str, ...], served: bool
) -> None:
    assert local_host(header, allowed, hostname="myhost") is served


def test_only_loopback_listeners_check_the_host() -> None:
    assert loopback_only("127.0.0.1") and loopback_only("::1") and loopback_only("localhost")
    assert not loopback_only("0.0.0.0") and not loopback_only("10.0.0.5")
