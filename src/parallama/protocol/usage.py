"""Token counts from the end of an answer, without parsing the answer (sans-I/O).

The relay keeps only the last few kilobytes of each answer (and of an event stream its first
few too). The APIs put their counts at the very end: Ollama's final object
(`prompt_eval_count`, `eval_count`, `eval_duration` in ns), OpenAI's `usage` object
(`prompt_tokens`, `completion_tokens`), which a stream carries only when the client asked for
`stream_options.include_usage`, and the Responses API's and Anthropic's (`input_tokens`,
`output_tokens`). An Anthropic stream says its prompt's count in its first event, and counts
the tokens read from its prompt cache apart (`cache_read_input_tokens`,
`cache_creation_input_tokens`): the prompt is all three. A count quoted inside generated text is
JSON-escaped (`\\"eval_count\\"`), so it cannot match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_BYTES = 4096
_COUNT = re.compile(
    rb'"(prompt_eval_count|eval_count|eval_duration|prompt_tokens|completion_tokens'
    rb"|input_tokens|output_tokens|cache_read_input_tokens|cache_creation_input_tokens)"
    rb'"\s*:\s*(\d+)'
)
_CACHE_COUNTS = (b"cache_read_input_tokens", b"cache_creation_input_tokens")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    generation_seconds: float | None = None  # the engine's own decode time, when it says
    estimated: bool = False  # counted by the gateway, not said by the engine


def estimated_usage(prompt_bytes: int, pieces: int) -> Usage:
    """What a stream that said nothing of its counts used, as far as the gateway saw it: an
    OpenAI stream whose client did not ask for `include_usage`, or one cut short. Engines
    stream a token per piece (an NDJSON line, an SSE event); a prompt is about four bytes a
    token. Never zero for a prompt that was sent, so that token limits cannot be dodged."""
    return Usage(prompt_tokens=max(1, prompt_bytes // 4), generated_tokens=pieces, estimated=True)


def keep_tail(tail: bytes, chunk: bytes) -> bytes:
    """The last `TAIL_BYTES` of everything seen so far."""
    if len(chunk) >= TAIL_BYTES:
        return chunk[-TAIL_BYTES:]
    return (tail + chunk)[-TAIL_BYTES:]


def usage_from_tail(tail: bytes) -> Usage | None:
    counts = dict(_COUNT.findall(tail))  # the last of each wins
    if not counts:
        return None
    prompt = counts.get(b"prompt_eval_count", counts.get(b"prompt_tokens"))
    generated = counts.get(b"eval_count", counts.get(b"completion_tokens"))
    if prompt is None and b"input_tokens" in counts:
        prompt = b"%d" % sum(int(counts.get(k, 0)) for k in (b"input_tokens", *_CACHE_COUNTS))
    if generated is None:
        generated = counts.get(b"output_tokens")
    duration = int(counts.get(b"eval_duration", 0))
    return Usage(
        prompt_tokens=None if prompt is None else int(prompt),
        generated_tokens=None if generated is None else int(generated),
        generation_seconds=duration / 1e9 if duration else None,
    )
