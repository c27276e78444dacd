"""The emulator's prompt cache checked against a real engine once: SmolLM2-135M on llama.cpp's
llama-server (one thread), whose slot reuses the longest common prefix of the prompt it
evaluated last.

For each of three long system prompts, in one run:
- cold: the system prompt and a question, nothing of it cached;
- next turn: the same conversation with the answer and a second question (all but the new part
  cached);
and the emulator's rule (prefill time proportional to the tokens not shared, at the speed the
cold prompts gave) is printed beside what the engine took. Time to first token is measured
with one token asked for: it is the prefill, and one token's decode.

    python benchmarks/prompt_cache_real.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from real_multi_instance import one_server

from parallama.launch.engines import SMOLLM2_ALIAS
from parallama.runtime import run

TOPICS = ("gardening", "sailing", "astronomy")


def system_prompt(topic: str) -> str:
    sentence = f"You are a patient assistant who knows {topic} well and answers briefly. "
    return sentence * 24  # some 350 tokens


async def first_token(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]
) -> tuple[float, int, str]:
    """Seconds to the first streamed token, the prompt's tokens, and a short answer."""
    body = {"model": SMOLLM2_ALIAS, "messages": messages, "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as reply:
        async for _ in reply.content:
            break
        took = time.perf_counter() - started
        async for _ in reply.content:
            pass
    async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
        answer: dict[str, Any] = orjson.loads(await reply.read())
    return took, answer["usage"]["prompt_tokens"], answer["choices"][0]["message"]["content"]


async def measure() -> list[tuple[str, int, float, int, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        async with one_server(1, Path(logs)) as url, aiohttp.ClientSession() as session:
            await first_token(session, url, [{"role": "user", "content": "Hello"}])  # warm-up
            for topic in TOPICS:
                chat = [
                    {"role": "system", "content": system_prompt(topic)},
                    {"role": "user", "content": f"What should I learn first about {topic}?"},
                ]
                cold, cold_tokens, answer = await first_token(session, url, chat)
                # The non-streamed call ran the same prompt last: the slot holds it and its answer.
                chat += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": "And after that?"},
                ]
                warm, warm_tokens, _ = await first_token(session, url, chat)
                rows.append((topic, cold_tokens, cold, warm_tokens, warm, 0.0))
    per_token = statistics.median(cold / tokens for _, tokens, cold, _, _, _ in rows)
    return [
        (topic, ct, cold, wt, warm, per_token * (wt - ct)) for topic, ct, cold, wt, warm, _ in rows
    ]


def main() -> None:
    rows: list[tuple[str, int, float, int, float, float]] = []

    async def go() -> None:
        rows.extend(await measure())

    run(go())
    print("Prompt cache, SmolLM2-135M on llama.cpp's llama-server (1 thread): first token")
    print(
        "| system prompt | cold: tokens, seconds | next turn: tokens, seconds | emulator's rule |"
    )
    print("|---|---|---|---|")
    for topic, cold_tokens, cold, warm_tokens, warm, predicted in rows:
        print(
            f"| {topic} | {cold_tokens}, {cold:.2f} s | {warm_tokens}, {warm:.2f} s "
            f"| {predicted:.2f} s (the {warm_tokens - cold_tokens} new tokens) |"
        )


if __name__ == "__main__":
    main()
