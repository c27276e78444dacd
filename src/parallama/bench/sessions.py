"""Coding-agent sessions for the load generator (sans-I/O): multi-turn conversations whose
prompts grow, as Claude Code's and Codex's do.

Every session of a slice shares one system prompt (an agent's instructions and its tools'
definitions, `system_tokens` long), then asks its own task; each turn appends the last answer
and a tool's result (`tool_tokens` long) and asks again. So a session's every turn repeats its
whole history: what an engine keeps of it in its prompt cache, and which engine the next turn is
routed to, decide how much of each prompt is evaluated again.

Prompts are made-up words (about a token each) with a salt first, one per slice, so that no
slice finds a prefix an earlier one left cached; a slice's sessions share their system prompt,
as an agent's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parallama.bench.trace import replay_prompt

TOOLS = ("read_file(path)", "edit(path, old, new)", "run(command)", "search(query)")
MAX_ANSWER_CHARS = 64 * 1024  # of an answer kept in the history (answers are short; bounded)


@dataclass(frozen=True)
class SessionShape:
    """What each session of a run looks like."""

    count: int  # sessions per target, over all rounds
    turns: int  # requests per session
    system_tokens: int = 2000
    tool_tokens: int = 150


def system_prompt(shape: SessionShape, salt: str) -> str:
    tools = "; ".join(TOOLS)
    head = f"{salt} You are a coding agent. You call tools and answer briefly. Tools: {tools}."
    return f"{head} {replay_prompt(0, shape.system_tokens, salt, fixed=len(head.split()))}"


@dataclass
class Conversation:
    """One session: its messages so far, and the next turn to ask."""

    shape: SessionShape
    system: str
    number: int  # of the session in its slice
    salt: str
    turn: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        task = f"Session {self.number}: fix the failing test in module_{self.number}.py."
        self.messages.append({"role": "user", "content": task})

    @property
    def done(self) -> bool:
        return self.turn >= self.shape.turns

    def answered(self, text: str) -> None:
        """The answer to the last turn came: it and a tool's result join the history."""
        self.turn += 1
        if self.done:
            return
        result = replay_prompt(
            self.number * 1000 + self.turn, self.shape.tool_tokens, f"{self.salt}tool", fixed=2
        )
        self.messages += [
            {"role": "assistant", "content": text[:MAX_ANSWER_CHARS] or "(no text)"},
            {"role": "user", "content": f"Tool result: {result}"},
        ]

    def request(self) -> dict[str, Any]:
        """The system prompt and the messages, for the workload to put in its API's shape."""
        return {"system": self.system, "messages": list(self.messages)}


def conversations(shape: SessionShape, count: int, salt: str) -> list[Conversation]:
    """A slice's `count` sessions, sharing their system prompt."""
    system = system_prompt(shape, salt)
    return [Conversation(shape, system, number, salt) for number in range(count)]
