"""What the emulated model answers: prompt size, answer tokens and stop reason (pure functions)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from parallama.sim.text import generate_tokens, seed_for, tokenize

Tokens = tuple[str, ...]
ASSISTANT_TURN = ("<|start|>", "assistant", "\n")  # what a chat prompt ends with


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


def chat_prompt(messages: list[dict[str, Any]], tools: Any = None) -> tuple[str, Tokens]:
    """The prompt text (for seeding) and its tokens as the model sees them: the tools offered
    (rendered first, as chat templates put them in the system turn), each message in the chat
    template's markers (four tokens a message), then the assistant's turn opened."""
    texts = [message_text(m) for m in messages]
    tokens: list[str] = []
    if tools:
        tokens += ["<|start|>", "tools", "\n", *tokenize(orjson.dumps(tools).decode()), "<|end|>"]
    for message, text in zip(messages, texts, strict=True):
        role = str(message.get("role", ""))
        tokens += ["<|start|>", role, "\n", *tokenize(text), "<|end|>"]
    return "\n".join(texts), (*tokens, *ASSISTANT_TURN)


def generate_prompt(prompt: str, system: str, context: list[int], raw: bool) -> tuple[str, Tokens]:
    """The prompt's tokens after the previous exchange's `context`, in the template's markers
    (four tokens) unless `raw`."""
    earlier = [str(token) for token in context]
    if raw:
        return f"{system}\n{prompt}", (*earlier, *tokenize(system), *tokenize(prompt))
    template = ("<|system|>", *tokenize(system), "<|user|>", *tokenize(prompt), "<|end|>")
    return f"{system}\n{prompt}", (*earlier, *template, *ASSISTANT_TURN)


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


def tool_call(
    tools: list[Any], messages: list[Any], answer: PlannedAnswer
) -> dict[str, Any] | None:
    """The emulated model calls a tool when it is offered some and the last word is the user's
    (after a tool's result it answers in text): the first tool, each required argument filled
    with a word of the planned answer, so that a client can run the call and send the result."""
    last = messages[-1] if messages else None
    if not tools or not isinstance(last, dict) or last.get("role") != "user":
        return None
    tool: dict[str, Any] = tools[0] if isinstance(tools[0], dict) else {}
    inner = tool.get("function")
    function: dict[str, Any] = inner if isinstance(inner, dict) else tool
    schema = function.get("parameters")
    required = schema.get("required", []) if isinstance(schema, dict) else []
    words = answer.text.split() or ["value"]
    arguments = {
        str(name): words[i % len(words)] for i, name in enumerate(required) if isinstance(name, str)
    }
    return {"name": str(function.get("name", "")), "arguments": arguments}


def context_ids(prompt: str, answer: str, prompt_tokens: int, answer_tokens: int) -> list[int]:
    """Token ids for generate's `context`: stable, and as many as prompt plus answer tokens."""
    rng = random.Random(seed_for("context", prompt, answer))
    return [rng.randrange(1, 32000) for _ in range(prompt_tokens + answer_tokens)]
