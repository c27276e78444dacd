"""What the load generator asks, in either API, and what it reads from the answers (sans-I/O).

Requests are built from a list of prompts (the seed's eight questions unless a file gives
others), the k-th request of every setup using the same prompt, so that setups compared in one run
do the same work; or, with `sessions`, from coding-agent conversations (`bench/sessions.py`).
Four APIs: Ollama's, OpenAI's chat completions, Anthropic's Messages and OpenAI's Responses.
Answers are read as they arrive: each streamed chunk that carries text counts as one token at the
moment it came (Ollama sends a chunk per token; so do OpenAI-compatible servers), and the final
counts come from the API (`eval_count` or `usage`) when it gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from parallama.bench.sessions import SessionShape
from parallama.bench.stats import Sample
from parallama.bench.trace import FIXED_TOKENS, TracedRequest, replay_prompt

Api = Literal["ollama", "openai", "anthropic", "responses"]
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
    ("anthropic", "chat"): "/v1/messages",
    ("responses", "chat"): "/v1/responses",
}
MAX_TEXT = 64 * 1024  # characters of an answer kept, for a session's next turn


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
    sessions: SessionShape | None = None  # agent sessions: the turns' bodies are `turn_body`'s

    @property
    def path(self) -> str:
        return _PATHS[self.api, self.kind]

    @property
    def supported(self) -> bool:
        return (self.api, self.kind) in _PATHS

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

    def turn_body(self, system: str, messages: list[dict[str, str]]) -> bytes:
        """A session's next turn: its system prompt and history, in the API's shape."""
        return self._body(self.model, "", self.max_tokens, system=system, messages=messages)

    def _body(
        self,
        model: str,
        prompt: str,
        max_tokens: int | None,
        *,
        system: str = "",
        messages: list[dict[str, str]] | None = None,
    ) -> bytes:
        body: dict[str, Any] = {"model": model}
        if self.kind == "embed":
            body["input"] = prompt
            return orjson.dumps(body)
        messages = messages or [{"role": "user", "content": prompt}]
        if self.api == "anthropic":
            return orjson.dumps(
                {**body, **({"system": system} if system else {}), "messages": messages,
                 "max_tokens": max_tokens or 1024, "stream": self.streams}
            )  # fmt: skip
        if self.api == "responses":
            body |= {"input": messages, "stream": self.streams, "store": False}
            if system:
                body["instructions"] = system
            if max_tokens is not None:
                body["max_output_tokens"] = max_tokens
            return orjson.dumps(body)
        if self.kind == "chat":
            system_message = [{"role": "system", "content": system}] if system else []
            body["messages"] = system_message + messages
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

    def __init__(self, workload: Workload, sample: Sample, *, keep_text: bool = False) -> None:
        self._api = workload.api
        self._sample = sample
        self._keep_text = keep_text
        self._text: list[str] = []
        self._kept = 0

    @property
    def text(self) -> str:
        """The answer's text (with `keep_text`; up to `MAX_TEXT` characters)."""
        return "".join(self._text)

    def whole(self, body: bytes) -> None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._sample.error = "bad answer"
            return
        if isinstance(data, dict):
            self._counts(data)
            self._keep(_whole_text(data))

    def line(self, raw: bytes, at: float) -> None:
        """One line of a stream (an NDJSON object, or an SSE `data:` line), `at` seconds after
        the request was sent."""
        raw = raw.strip()
        if self._api != "ollama":  # server-sent events
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
        if "error" in data or data.get("type") in ("error", "response.failed"):
            self._sample.error = "stream error"  # the answer broke off after it began
            return
        if piece := _piece(data):
            if self._sample.first_token is None:
                self._sample.first_token = at
            self._sample.token_times.append(at)
            self._keep(piece)
        self._counts(data)

    def _keep(self, text: str) -> None:
        if self._keep_text and self._kept < MAX_TEXT:
            self._text.append(text[: MAX_TEXT - self._kept])
            self._kept += len(self._text[-1])

    def _counts(self, data: dict[str, Any]) -> None:
        sample = self._sample
        for holder in (data, data.get("message"), data.get("response")):
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                self._usage(usage)
        sample.prompt_tokens = _int(data.get("prompt_eval_count"), sample.prompt_tokens)
        sample.output_tokens = _int(data.get("eval_count"), sample.output_tokens)
        duration = data.get("eval_duration")
        if isinstance(duration, int) and duration > 0:
            sample.server_decode_seconds = duration / 1e9

    def _usage(self, usage: dict[str, Any]) -> None:
        """OpenAI's counts (`prompt_tokens`, `completion_tokens`), or Anthropic's and the
        Responses API's (`input_tokens`, `output_tokens`; Anthropic's leave out what was read
        from or written to its cache)."""
        sample = self._sample
        sample.output_tokens = _int(usage.get("completion_tokens"), sample.output_tokens)
        sample.output_tokens = _int(usage.get("output_tokens"), sample.output_tokens)
        prompt = _int(usage.get("prompt_tokens"), None)
        if prompt is None and isinstance(usage.get("input_tokens"), int):
            prompt = usage["input_tokens"]
            if self._api == "anthropic":
                for cached in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                    prompt += _int(usage.get(cached), 0) or 0
        if prompt:  # Anthropic's message_start may say 0 before the engine counted
            sample.prompt_tokens = prompt


def _piece(data: dict[str, Any]) -> str:
    """The generated text a streamed chunk carries, in any of the four APIs' shapes."""
    message = data.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])  # Ollama's chat
    if isinstance(data.get("response"), str):
        return str(data["response"])  # Ollama's generate
    delta = data.get("delta")
    if data.get("type") == "response.output_text.delta" and isinstance(delta, str):
        return delta  # Responses
    if data.get("type") == "content_block_delta" and isinstance(delta, dict):
        return str(delta.get("text") or "")  # Anthropic's
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            return str(delta["content"])
        return str(choice.get("text") or "")
    return ""


def _whole_text(data: dict[str, Any]) -> str:
    """A whole answer's text, in any of the four APIs' shapes."""
    if piece := _piece(data):
        return piece  # Ollama's, and OpenAI's completions
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    blocks = data.get("content")  # Anthropic's
    if data.get("object") == "response":
        items = data.get("output")
        blocks = [
            part for item in items if isinstance(item, dict)
            for part in item.get("content") or () if isinstance(part, dict)
        ] if isinstance(items, list) else []  # fmt: skip
    if isinstance(blocks, list):
        return "".join(str(b.get("text") or "") for b in blocks if isinstance(b, dict))
    return ""


def _int(value: Any, otherwise: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else otherwise
