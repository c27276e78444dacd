"""What the load generator asks, in either API, and what it reads from the answers (sans-I/O).

Requests are built from a list of prompts (the seed's eight questions unless a file gives
others), the k-th request of every setup using the same prompt, so that setups compared in one run
do the same work. Answers are read as they arrive: each streamed chunk that carries text counts as
one token at the moment it came (Ollama sends a chunk per token; so do OpenAI-compatible
servers), and the final counts come from the API (`eval_count` or `usage`) when it gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from parallama.bench.stats import Sample
from parallama.bench.trace import FIXED_TOKENS, TracedRequest, replay_prompt

Api = Literal["ollama", "openai"]
Kind = Literal["chat", "generate", "embed"]

# The seed document's load test asks these eight questions (in Chinese there).
SEED_QUESTIONS = (
    "What is Python?",
    "What is the difference between Docker and a VM?",
    "Explain quantum computing.",
    "How do I deploy Kubernetes?",
    "What is RAG?",
    "Write a quicksort.",
    "What are the pros and cons of microservices?",
    "What is a vector database?",
)
_PATHS: dict[tuple[Api, Kind], str] = {
    ("ollama", "chat"): "/api/chat",
    ("ollama", "generate"): "/api/generate",
    ("ollama", "embed"): "/api/embed",
    ("openai", "chat"): "/v1/chat/completions",
    ("openai", "generate"): "/v1/completions",
    ("openai", "embed"): "/v1/embeddings",
}


class PromptError(ValueError):
    """A prompts file that cannot be used; the message says where and why."""


def load_prompts(path: Path) -> list[str]:
    """Prompts from a file: JSON Lines (a string, or an object with `prompt` or `text`) when
    it ends in .jsonl, else one prompt per non-empty line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PromptError(f"cannot read {path}: {exc.strerror}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        prompts = [line.strip() for _, line in lines]
    else:
        prompts = [_json_prompt(path, n, line) for n, line in lines]
    if not prompts:
        raise PromptError(f"{path} has no prompts")
    return prompts


def _json_prompt(path: Path, number: int, line: str) -> str:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise PromptError(f"{path}:{number}: not JSON: {exc.msg}") from None
    if isinstance(value, dict):
        value = value.get("prompt", value.get("text"))
    if not isinstance(value, str) or not value:
        raise PromptError(f'{path}:{number}: expected a string or {{"prompt": "..."}}')
    return value


@dataclass(frozen=True)
class Workload:
    api: Api
    kind: Kind
    model: str
    prompts: tuple[str, ...] = SEED_QUESTIONS
    stream: bool = True
    max_tokens: int | None = None
    trace: tuple[TracedRequest, ...] = ()  # replayed: the n-th request is the trace's n-th
    salt: str = ""  # replayed: starts every prompt, one per run (engines keep prompts cached)
    fixed_tokens: int = FIXED_TOKENS  # replayed: what the target counts for a prompt of no words

    @property
    def path(self) -> str:
        return _PATHS[self.api, self.kind]

    @property
    def streams(self) -> bool:
        return self.stream and self.kind != "embed"

    def body(self, n: int) -> bytes:
        """The n-th request: of the prompts in turn, or of the trace (a made-up prompt of its
        length, an answer of its length: `ignore_eos` and `min_tokens`, which llama.cpp's and
        vLLM's servers read, keep an engine from ending it sooner)."""
        if self.trace:
            traced = self.trace[n]
            return self._body(
                traced.model,
                replay_prompt(n, traced.prompt_tokens, self.salt, self.fixed_tokens),
                traced.generated_tokens,
            )
        return self._body(self.model, self.prompts[n % len(self.prompts)], self.max_tokens)

    def _body(self, model: str, prompt: str, max_tokens: int | None) -> bytes:
        body: dict[str, Any] = {"model": model}
        if self.kind == "embed":
            body["input"] = prompt
            return orjson.dumps(body)
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body["stream"] = self.streams
        if self.api == "openai":
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if self.trace and max_tokens is not None:  # as long as traced: llama.cpp, vLLM
                body["ignore_eos"] = True
                body["min_tokens"] = max_tokens
            if self.streams:
                body["stream_options"] = {"include_usage": True}
        elif max_tokens is not None:
            body["options"] = {"num_predict": max_tokens}
        return orjson.dumps(body)


class AnswerReader:
    """Fills in a `Sample` from an answer's bytes: whole, or streamed line by line."""

    def __init__(self, workload: Workload, sample: Sample) -> None:
        self._api = workload.api
        self._sample = sample

    def whole(self, body: bytes) -> None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._sample.error = "bad answer"
            return
        if isinstance(data, dict):
            self._counts(data)

    def line(self, raw: bytes, at: float) -> None:
        """One line of a stream (an NDJSON object, or an SSE `data:` line), `at` seconds after
        the request was sent."""
        raw = raw.strip()
        if self._api == "openai":
            if not raw.startswith(b"data:"):
                return  # blank separators, comments, other SSE fields
            raw = raw[5:].strip()
            if raw == b"[DONE]":
                return
        if not raw:
            return
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._sample.error = "bad answer"
            return
        if not isinstance(data, dict):
            return
        if "error" in data:
            self._sample.error = "stream error"  # the answer broke off after it began
            return
        if _text(data):
            if self._sample.first_token is None:
                self._sample.first_token = at
            self._sample.token_times.append(at)
        self._counts(data)

    def _counts(self, data: dict[str, Any]) -> None:
        sample = self._sample
        usage = data.get("usage")
        if isinstance(usage, dict):
            sample.prompt_tokens = _int(usage.get("prompt_tokens"), sample.prompt_tokens)
            sample.output_tokens = _int(usage.get("completion_tokens"), sample.output_tokens)
        sample.prompt_tokens = _int(data.get("prompt_eval_count"), sample.prompt_tokens)
        sample.output_tokens = _int(data.get("eval_count"), sample.output_tokens)
        duration = data.get("eval_duration")
        if isinstance(duration, int) and duration > 0:
            sample.server_decode_seconds = duration / 1e9


def _text(data: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text (in either API's shape)."""
    message = data.get("message")
    if isinstance(message, dict) and message.get("content"):
        return True
    if data.get("response"):
        return True
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        return bool((isinstance(delta, dict) and delta.get("content")) or choices[0].get("text"))
    return False


def _int(value: Any, otherwise: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else otherwise
