"""What the emulated model answers: prompt size, answer tokens and stop reason (pure functions)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from parallama.sim.text import count_tokens, generate_tokens, seed_for

CHAT_TOKENS_PER_MESSAGE = 4  # role markers of a chat template
GENERATE_TEMPLATE_TOKENS = 4


@dataclass(frozen=True)
class PlannedAnswer:
    tokens: list[str]
    done_reason: str  # "stop" or "length"

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def chat_prompt(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The prompt text (for seeding) and its token count, template overhead included."""
    texts = [message_text(m) for m in messages]
    tokens = sum(count_tokens(t) + CHAT_TOKENS_PER_MESSAGE for t in texts)
    return "\n".join(texts), tokens


def generate_prompt(prompt: str, system: str, context: list[int], raw: bool) -> tuple[str, int]:
    overhead = 0 if raw else GENERATE_TEMPLATE_TOKENS
    tokens = count_tokens(system) + count_tokens(prompt) + len(context) + overhead
    return f"{system}\n{prompt}", tokens


def plan_answer(
    *,
    model: str,
    prompt: str,
    num_predict: int | None,
    request_seed: int | None,
    server_seed: int,
    length_range: tuple[int, int],
) -> PlannedAnswer:
    """The answer's tokens, deterministic in (model, prompt, seeds); cut at `num_predict`."""
    rng = random.Random(seed_for(model, prompt, request_seed, server_seed))
    natural = rng.randint(*length_range)
    if num_predict is not None and 0 <= num_predict < natural:
        return PlannedAnswer(generate_tokens(rng, prompt, num_predict), "length")
    return PlannedAnswer(generate_tokens(rng, prompt, natural), "stop")


def context_ids(prompt: str, answer: str, prompt_tokens: int, answer_tokens: int) -> list[int]:
    """Token ids for generate's `context`: stable, and as many as prompt plus answer tokens."""
    rng = random.Random(seed_for("context", prompt, answer))
    return [rng.randrange(1, 32000) for _ in range(prompt_tokens + answer_tokens)]
