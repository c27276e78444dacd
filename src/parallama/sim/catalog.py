"""The emulated server's installed models: names, sizes and details as `/api/tags` shows them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from parallama.protocol.ollama import normalize_name


@dataclass(frozen=True)
class ModelSpec:
    name: str  # full name with tag, e.g. "qwen2.5:7b"
    family: str
    parameter_size: str  # as Ollama prints it: "7.6B"
    quantization_level: str
    size: int  # bytes on disk, and in memory when loaded (no KV cache accounted)
    context_length: int
    embedding_length: int  # hidden size; the vector size for embedding models
    is_embedding: bool = False
    block_count: int = 32  # layers
    head_count_kv: int = 8  # attention heads of keys and values (fewer than queries': GQA)
    head_dim: int = 128

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache per token at f16 (Ollama's default `OLLAMA_KV_CACHE_TYPE`): a key and a
        value per layer and KV head."""
        return self.block_count * self.head_count_kv * self.head_dim * 2 * 2

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def capabilities(self) -> list[str]:
        return ["embedding"] if self.is_embedding else ["completion", "tools"]


def _spec(
    name: str,
    family: str,
    params_b: float,
    context: int,
    hidden: int,
    *,
    layers: tuple[int, int, int] = (32, 8, 128),
    quant: str = "Q4_K_M",
    embed: bool = False,
) -> ModelSpec:
    """`layers`: how many, and the KV heads and head size of each (the model card's
    `num_hidden_layers`, `num_key_value_heads`, `head_dim`)."""
    bits = 4.85 if quant == "Q4_K_M" else 16.0
    size = int(params_b * 1e9 * bits / 8)
    label = f"{params_b:g}B" if params_b >= 1 else f"{params_b * 1000:g}M"
    return ModelSpec(name, family, label, quant, size, context, hidden, embed, *layers)


KNOWN_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("qwen2.5:7b", "qwen2", 7.6, 32768, 3584, layers=(28, 4, 128)),
        _spec("qwen2.5:14b", "qwen2", 14.8, 32768, 5120, layers=(48, 8, 128)),
        _spec("qwen2.5:32b", "qwen2", 32.8, 32768, 5120, layers=(64, 8, 128)),
        _spec("qwen2.5:72b", "qwen2", 72.7, 32768, 8192, layers=(80, 8, 128)),
        _spec("qwen2.5-coder:7b", "qwen2", 7.6, 32768, 3584, layers=(28, 4, 128)),
        _spec("llama3.1:8b", "llama", 8.0, 131072, 4096, layers=(32, 8, 128)),
        _spec("llama3.1:70b", "llama", 70.6, 131072, 8192, layers=(80, 8, 128)),
        _spec("llama3.2:3b", "llama", 3.2, 131072, 3072, layers=(28, 8, 128)),
        _spec("mistral:7b", "llama", 7.2, 32768, 4096, layers=(32, 8, 128)),
        _spec("smollm2:135m", "llama", 0.135, 8192, 576, layers=(30, 3, 64), quant="F16"),
        # embedding models: no KV cache kept, so their layers are left at the default
        _spec("nomic-embed-text:latest", "nomic-bert", 0.137, 2048, 768, quant="F16", embed=True),
        _spec("all-minilm:latest", "bert", 0.023, 512, 384, quant="F16", embed=True),
        _spec("mxbai-embed-large:latest", "bert", 0.334, 512, 1024, quant="F16", embed=True),
        _spec("bge-m3:latest", "bert", 0.567, 8192, 1024, quant="F16", embed=True),
    )
}

DEFAULT_MODELS = ("qwen2.5:7b", "llama3.2:3b", "nomic-embed-text:latest")

_EMBED_HINT = re.compile(r"embed|minilm|bge|e5-|gte")
_SIZE_TAG = re.compile(r":(\d+(?:\.\d+)?)([bm])\b", re.IGNORECASE)


def spec_for(name: str) -> ModelSpec:
    """The spec of a known model, or a plausible one made up from the name ("foo:13b")."""
    full = normalize_name(name)
    if full in KNOWN_MODELS:
        return KNOWN_MODELS[full]
    is_embed = bool(_EMBED_HINT.search(full))
    match = _SIZE_TAG.search(full)
    params = 7.0
    if match:
        params = float(match.group(1)) / (1000 if match.group(2).lower() == "m" else 1)
    elif is_embed:
        params = 0.137
    family = re.split(r"[^a-z]+", full.split("/")[-1].lower())[0] or "llama"
    hidden = 768 if is_embed else 4096
    return _spec(
        full, family, params, 8192, hidden, quant="F16" if is_embed else "Q4_K_M", embed=is_embed
    )
