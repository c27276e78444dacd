"""Ollama's native wire format: error bodies, timestamps, statistics, fixed texts.

Shared by the emulator (which speaks it) and the gateway (which relays and sometimes writes it).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import orjson

NDJSON = "application/x-ndjson"
ROOT_TEXT = "Ollama is running"
SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"
NOT_FOUND_TEXT = "404 page not found"
METHOD_NOT_ALLOWED_TEXT = "405 method not allowed"
# Go's time.Duration maximum: Ollama's "keep forever", so /api/ps shows an expiry ~292 years out.
FOREVER_SECONDS = (2**63 - 1) / 1e9
GO_ZERO_TIME = "0001-01-01T00:00:00Z"  # how Go marshals an unset time.Time


# A current release: what the emulator reports, and what the gateway says of a fleet with no
# Ollama in it (it serves every route this release has, translating where an engine lacks one).
CURRENT_VERSION = "0.32.6"
# The first release with each route that an engine may lack (Ollama's server/routes.go).
ROUTE_SINCE = {"/v1/responses": (0, 13, 3), "/v1/messages": (0, 14, 0)}


# A blob's name in `/api/blobs/:digest` (Ollama's manifest.BlobsPath accepts `sha256-` too).
BLOB_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
INVALID_DIGEST = "invalid digest format"


def parse_version(text: Any) -> tuple[int, int, int] | None:
    """Ollama's `/api/version` text ("0.14.2", "0.15.0-rc1", "v0.9.0") as three numbers; None
    for what is not a version."""
    if not isinstance(text, str):
        return None
    numbers = text.strip().removeprefix("v").split("-", 1)[0].split(".")
    if len(numbers) != 3 or not all(n.isdigit() and len(n) <= 6 for n in numbers):
        return None
    major, minor, patch = (int(n) for n in numbers)
    return major, minor, patch


def routes_since(version: tuple[int, int, int]) -> frozenset[str]:
    """The routes of `ROUTE_SINCE` an Ollama of this version serves."""
    return frozenset(route for route, first in ROUTE_SINCE.items() if version >= first)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def normalize_name(name: str) -> str:
    """Ollama's name resolution for our purposes: a name without a tag means `:latest`."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


# Ollama's longest name parts, in bytes (types/model/name.go, `isValidLen`): host 350, namespace,
# model and tag 80 each; so no valid name is longer than 593 bytes.
NAME_PART_LIMITS = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
SCHEME_LIMIT = 16  # `https://` and the like, before the host


def name_parts(name: str) -> dict[str, str]:
    """A model name cut as Ollama cuts it: [host/][namespace/]model[:tag], the tag after the
    last ':' that follows the last '/', the model after the last '/', and so on."""
    name = name.partition("://")[2] or name  # a scheme is not part of the host (Ollama's too)
    rest, tag = name, ""
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon > slash:
        rest, tag = name[:colon], name[colon + 1 :]
    *above, model = rest.split("/")
    namespace = above.pop() if above else ""
    return {"host": "/".join(above), "namespace": namespace, "model": model, "tag": tag}


def name_too_long(name: str) -> str | None:
    """Why a model name cannot be one Ollama accepts for its length, or None. Only lengths are
    checked: OpenAI-dialect engines name models more freely than Ollama (paths, capitals).
    Not cached: a cache keyed by the names clients send keeps megabytes of them."""
    scheme, cut, _ = name.partition("://")
    if cut and len(scheme.encode()) > SCHEME_LIMIT:  # dropped by Ollama, but no name's part
        return f"its scheme is {len(scheme.encode())} bytes, more than {SCHEME_LIMIT}"
    for part, text in name_parts(name).items():
        size, limit = len(text.encode()), NAME_PART_LIMITS[part]
        if size > limit:
            return f"its {part} part is {size} bytes, more than Ollama's limit of {limit}"
    return None


def model_not_found(name: str) -> str:
    return f"model '{name}' not found"


def rfc3339(timestamp: float) -> str:
    """A Unix time as Go marshals `time.Time`: RFC 3339, no trailing zeros in the fraction."""
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def nanoseconds(seconds: float) -> int:
    return max(round(seconds * 1e9), 0)


def final_statistics(
    *,
    total: float,
    load: float,
    prompt_eval_count: int,
    prompt_eval: float,
    eval_count: int,
    eval_: float,
) -> dict[str, Any]:
    """The timing fields of a final chunk, in nanoseconds; zero values omitted as Ollama does."""
    fields = {
        "total_duration": nanoseconds(total),
        "load_duration": nanoseconds(load),
        "prompt_eval_count": prompt_eval_count,
        "prompt_eval_duration": nanoseconds(prompt_eval),
        "eval_count": eval_count,
        "eval_duration": nanoseconds(eval_),
    }
    return {k: v for k, v in fields.items() if v}


def model_details(
    family: str = "", parameter_size: str = "", quantization_level: str = "", fmt: str = "gguf"
) -> dict[str, Any]:
    """A model row's `details`, as Ollama marshals them (no family: `families` is null)."""
    return {
        "parent_model": "",
        "format": fmt,
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size,
        "quantization_level": quantization_level,
    }


def model_row(
    name: str, *, size: int, digest: str, details: dict[str, Any], **more: Any
) -> dict[str, Any]:
    """A row of `/api/tags` (with `modified_at`) or of `/api/ps` (with `expires_at`,
    `size_vram`, `context_length`)."""
    return {"name": name, "model": name, "size": size, "digest": digest, "details": details, **more}


def served_model(name: str, *, expires: bool) -> dict[str, Any]:
    """An `/api/tags` row (or with `expires`, an `/api/ps` row) for a model that an
    OpenAI-dialect engine serves: its name is all such an engine tells."""
    details = model_details(fmt="")
    if expires:  # the engine keeps it loaded for as long as it runs
        return model_row(
            name,
            size=0,
            digest="",
            details=details,
            expires_at=rfc3339(FOREVER_SECONDS),
            size_vram=0,
        )
    return model_row(name, size=0, digest="", details=details, modified_at=GO_ZERO_TIME)


def generate_chunk(model: str, created_at: str, text: str) -> dict[str, Any]:
    """A streamed `/api/generate` chunk (the final one adds `done: true` and its statistics)."""
    return {"model": model, "created_at": created_at, "response": text, "done": False}


def chat_chunk(model: str, created_at: str, text: str) -> dict[str, Any]:
    """A streamed `/api/chat` chunk (the final one adds `done: true` and its statistics)."""
    message = {"role": "assistant", "content": text}
    return {"model": model, "created_at": created_at, "message": message, "done": False}


def kv_bytes_per_token(model_info: Any) -> int | None:
    """A model's KV cache per token at f16 (Ollama's default `OLLAMA_KV_CACHE_TYPE`), from
    `/api/show`'s `model_info`: a key and a value per layer and KV head (a list of heads per
    layer where layers differ; the attention heads where no KV heads are given, as llama.cpp
    reads it). None where it does not tell, or tells what no engine keeps: under 1 KiB or over
    16 MiB a token."""
    if not isinstance(model_info, dict):
        return None
    arch = model_info.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def count(value: Any) -> int | None:
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        )

    def number(key: str) -> int | None:
        return count(model_info.get(f"{arch}.{key}"))

    layers, heads = number("block_count"), number("attention.head_count")
    width = number("embedding_length")
    default_dim = width // heads if width and heads else None
    key_dim = number("attention.key_length") or default_dim
    value_dim = number("attention.value_length") or default_dim
    if not layers or not key_dim or not value_dim:
        return None
    kv_heads = model_info.get(f"{arch}.attention.head_count_kv", heads)
    if (each := count(kv_heads)) is not None:
        heads_kv = each * layers
    elif isinstance(kv_heads, list) and all(
        h == 0 or count(h) is not None for h in kv_heads[:layers]
    ):
        heads_kv = sum(kv_heads[:layers])
    else:
        return None
    total = heads_kv * (key_dim + value_dim) * 2
    return total if 1024 <= total <= 2**24 else None


# What `/api/show` says of a model an OpenAI-dialect engine serves: such an engine does not
# tell its architecture, and clients read only `{architecture}.context_length` from it.
UNKNOWN_ARCHITECTURE = "unknown"


def shown_model(row: Any, props: Any) -> dict[str, Any]:
    """`/api/show`'s answer for a model an OpenAI-dialect engine serves, from its `/v1/models`
    row and (llama-server) its `/props`: the context a request may use (a slot's `n_ctx`,
    vLLM's `max_model_len`, else the trained context), the chat template, and capabilities:
    tools where the template takes them (or no template is told: vLLM), vision where the
    engine has a projector. What Zed, Continue, Codex and Open WebUI read to size prompts and
    to offer tools."""
    row = row if isinstance(row, dict) else {}
    props = props if isinstance(props, dict) else {}
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    settings = props.get("default_generation_settings")
    settings = settings if isinstance(settings, dict) else {}

    def count(value: Any) -> int | None:
        positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value if positive else None

    context = (
        count(settings.get("n_ctx"))
        or count(row.get("max_model_len"))
        or count(meta.get("n_ctx_train"))
    )
    template = props.get("chat_template")
    template = template if isinstance(template, str) else None
    modalities = props.get("modalities") if isinstance(props.get("modalities"), dict) else {}
    capabilities = ["completion"]
    if template is None or "tool" in template:
        capabilities.append("tools")
    if modalities.get("vision") is True:
        capabilities.append("vision")
    parameters = count(meta.get("n_params"))
    info: dict[str, Any] = {"general.architecture": UNKNOWN_ARCHITECTURE}
    if parameters is not None:
        info["general.parameter_count"] = parameters
    if context is not None:
        info[f"{UNKNOWN_ARCHITECTURE}.context_length"] = context
    size = _parameter_size(parameters) if parameters is not None else ""
    return {
        "modelfile": "",
        "parameters": "",
        "template": template or "",
        "details": model_details(parameter_size=size, fmt="gguf" if props else ""),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": GO_ZERO_TIME,
    }


def _parameter_size(parameters: int) -> str:
    """Ollama's way of writing a parameter count: "135M", "7.6B"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.1f}".removesuffix(".0") + unit
    return str(parameters)
