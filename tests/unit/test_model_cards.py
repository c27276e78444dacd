"""What `/api/show` keeps (bounded in bytes) and builds for OpenAI-dialect engines."""

from __future__ import annotations

from parallama.gateway.models.show import ENTRY_BYTES, ByteBoundedCache
from parallama.protocol.ollama import shown_model


def test_the_cache_is_bounded_in_bytes_not_entries() -> None:
    cache = ByteBoundedCache(limit=10_000)
    for n in range(100):
        cache.put(n, b"x" * 1_000)
    assert cache.size <= 10_000
    assert cache.get(99, now=0) is not None
    assert cache.get(0, now=0) is None  # the least recently used went first
    cache.put("huge", b"x" * (ENTRY_BYTES + 1))
    assert cache.get("huge", now=0) is None


def test_an_entry_expires() -> None:
    cache = ByteBoundedCache()
    cache.put("built", b"{}", expires=5.0)
    assert cache.get("built", now=4.0) == b"{}"
    assert cache.get("built", now=6.0) is None
    assert cache.size == 0


def test_vllm_is_told_by_its_max_model_len_and_takes_tools() -> None:
    shown = shown_model({"id": "qwen", "max_model_len": 32768}, None)
    assert shown["model_info"]["unknown.context_length"] == 32768
    assert shown["capabilities"] == ["completion", "tools"]


def test_llama_server_is_told_by_a_slots_context_its_template_and_projector() -> None:
    row = {"id": "m", "meta": {"n_ctx_train": 8192, "n_params": 134_515_008}}
    props = {
        "default_generation_settings": {"n_ctx": 4096},
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "modalities": {"vision": True},
    }
    shown = shown_model(row, props)
    assert shown["model_info"]["unknown.context_length"] == 4096
    assert shown["capabilities"] == ["completion", "vision"]  # this template takes no tools
    assert shown["details"]["parameter_size"] == "134.5M"
