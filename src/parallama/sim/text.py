"""Deterministic text, token counts and embeddings for the emulator.

A token here is a word (with its leading space) or one punctuation mark, and `count_tokens`
counts exactly those, so the `eval_count` the emulator reports always matches the text it sent.
The same request (model, prompt, seed) always produces the same answer: tests and benchmarks
can compare runs byte for byte.
"""

from __future__ import annotations

import hashlib
import math
import random
import re

_TOKEN = re.compile(r"\w+|[^\w\s]")

# Words of a plain technical register, so answers read like prose about serving models.
_VOCABULARY = """
the a an this that each every many some model server request queue slot batch token
latency throughput memory context cache prompt answer user team instance gateway backend
system process result answer question example reason value time second minute step case is
are was can will should may must often usually rarely first then next finally also runs
waits loads serves streams returns handles keeps shares splits measures improves reduces
increases balances schedules processes generates reads writes fast slow small large local
remote busy idle parallel concurrent single several simple clear careful stable steady
better worse good useful practical important and or but so because while when if with
without for from into over under between of to in on at by as per than more less most
least very quite
""".split()  # noqa: SIM905 (a word list reads better as text)

_OPENERS = (
    "In short",
    "As a rule",
    "In practice",
    "For example",
    "Put simply",
    "On balance",
)


def count_tokens(text: str) -> int:
    """Tokens in `text`, by the emulator's tokenizer (words and punctuation marks)."""
    return len(_TOKEN.findall(text))


def tokenize(text: str) -> list[str]:
    """`text` as the emulator's tokenizer cuts it: words and punctuation marks."""
    return _TOKEN.findall(text)


def seed_for(*parts: object) -> int:
    """A stable 64-bit seed from request material (Python's `hash` is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def natural_length(rng: random.Random, low: int, high: int) -> int:
    """How many tokens the model 'wants' to say before stopping on its own."""
    return rng.randint(low, high)


def generate_tokens(rng: random.Random, prompt: str, count: int) -> list[str]:
    """`count` tokens of plausible English prose that picks up words from the prompt."""
    topic = [w.lower() for w in re.findall(r"[A-Za-z]{5,}", prompt)][:24]
    tokens: list[str] = []
    sentence_left = 0
    while len(tokens) < count:
        if sentence_left == 0:
            if tokens:
                tokens.append(".")
                if len(tokens) >= count:
                    break
            sentence_left = rng.randint(6, 16)
            opener = rng.choice(_OPENERS) if rng.random() < 0.25 else None
            if opener:
                words = opener.split()
                for i, word in enumerate(words):
                    tokens.append(word if not tokens and i == 0 else " " + word)
                tokens.append(",")
            else:
                word = rng.choice(_VOCABULARY).capitalize()
                tokens.append(word if not tokens else " " + word)
                sentence_left -= 1
            continue
        use_topic = topic and rng.random() < 0.2
        word = rng.choice(topic) if use_topic else rng.choice(_VOCABULARY)
        tokens.append(" " + word)
        sentence_left -= 1
        if sentence_left > 3 and rng.random() < 0.06:
            tokens.append(",")
    return tokens[:count]


def embedding(model: str, text: str, dimensions: int) -> list[float]:
    """An L2-normalised vector, the same for the same (model, text), as Ollama returns."""
    rng = random.Random(seed_for("embed", model, text))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    return normalise(vector)


def normalise(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
