"""Coding-agent sessions through the gateway: what it adds to the Anthropic Messages API, passed
through to an Ollama that serves it and translated for one that does not, measured in one run.

Each session is what Claude Code sends: a streamed `/v1/messages` request with a system prompt
and tool definitions of a few thousand tokens; each turn appends the last answer and a tool's
result, so the prompt grows. `--sessions` of them run at once, `--turns` turns each, over two
emulated Ollama servers with slots for all (no queueing: what is measured is the path, not the
wait). The gateway runs alone on one CPU, the emulators and the load on the other. Every target
gets the same sessions, in turn, `--rounds` times:

- direct: the emulator's own `/v1/messages` (Ollama >= 0.14);
- through the gateway, passed through to it;
- translated: the gateway in front of Ollama 0.12 (no `/v1/messages`), doing the work with its
  `/v1/chat/completions` -- against that emulator's `/v1/chat/completions` directly, the same work;
- the chat-completions stream through the gateway, for the per-event relay cost.

Printed: time to the first token's event (p50, p99) and what the gateway adds to it, and the
gateway's CPU time per relayed event (from /proc, the gateway alone). Target (issue 27): added
p50 <= 2 ms, passed through and translated.

    python benchmarks/agents.py [--sessions 4] [--turns 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import started_process

MODEL = "qwen2.5:7b"
# The gateway alone on one CPU; the emulators and this load on the other (as
# gateway_overhead.py), so that what the gateway adds is not the load's CPU.
GATEWAY_CPU, LOAD_CPU = "0", "1"
TOOLS = [
    {
        "name": name,
        "description": f"{name}: "
        + "Runs the operation on the workspace and returns its output. " * 12,
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "arguments": {"type": "string"}},
            "required": ["path"],
        },
    }
    for name in ("read_file", "write_file", "edit_file", "run_shell", "search", "list_files")
]
SYSTEM = "You are a coding agent working in a repository. " + "Follow the project's rules. " * 300
RESULT = "line of tool output with a path/to/file.py:123 and some text\n" * 12


@dataclass
class Measured:
    first_token: list[float] = field(default_factory=list)  # seconds, per turn
    events: int = 0


def tool_turn(turn: int, answer: str, *, chat: bool) -> list[dict[str, Any]]:
    """The agent's next step: the model's last answer with a tool call, then the tool's result
    (after which the model answers in text, as the emulator does)."""
    call_id = f"call_{turn}"
    arguments = {"path": f"src/module_{turn}.py"}
    if chat:
        function = {"name": "read_file", "arguments": orjson.dumps(arguments).decode()}
        call = {"id": call_id, "type": "function", "function": function}
        return [
            {"role": "assistant", "content": answer, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": f"Turn {turn}: {RESULT}"},
        ]
    use = {"type": "tool_use", "id": call_id, "name": "read_file", "input": arguments}
    result = {"type": "tool_result", "tool_use_id": call_id, "content": f"Turn {turn}: {RESULT}"}
    return [
        {"role": "assistant", "content": [{"type": "text", "text": answer}, use]},
        {"role": "user", "content": [result]},
    ]


def request_body(session: int, history: list[dict[str, Any]], *, chat: bool) -> dict[str, Any]:
    """What Claude Code sends (or, `chat`, the same conversation as the translating gateway
    sends it to an engine's chat completions)."""
    system = f"Session {session}. {SYSTEM}"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "stream": True}
    if not chat:
        return {**body, "system": system, "tools": TOOLS, "messages": history}
    tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in TOOLS
    ]
    messages = [{"role": "system", "content": system}, *history]
    return {**body, "stream_options": {"include_usage": True}, "messages": messages, "tools": tools}


async def session(
    client: aiohttp.ClientSession, url: str, number: int, *, turns: int, api: str, into: Measured
) -> None:
    chat = api == "chat"
    history: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing test."}]
    answer = "I will look at the code."
    path = "/v1/chat/completions" if chat else "/v1/messages"
    for turn in range(turns):
        history += tool_turn(turn, answer, chat=chat)
        body = request_body(number, history, chat=chat)
        started_at = time.perf_counter()
        first: float | None = None
        text = []
        async with client.post(url + path, data=orjson.dumps(body)) as reply:
            assert reply.status == 200, await reply.text()
            async for line in reply.content:
                if not line.startswith(b"data: {"):
                    continue
                into.events += 1
                piece = _text(orjson.loads(line[6:]), chat=chat)
                if piece is not None:
                    if first is None:
                        first = time.perf_counter() - started_at
                    text.append(piece)
        assert first is not None, "no token came"
        into.first_token.append(first)
        answer = "".join(text)


def _text(data: dict[str, Any], *, chat: bool) -> str | None:
    """A token's text, if the event carries one."""
    if chat:
        choices = data.get("choices") or [{}]
        content = (choices[0].get("delta") or {}).get("content")
        return content if isinstance(content, str) and content else None
    if data.get("type") == "content_block_delta":
        delta = data["delta"]
        return str(delta.get("text", "")) or None
    return None


async def run(url: str, sessions: int, turns: int, api: str) -> Measured:
    measured = Measured()
    connector = aiohttp.TCPConnector(limit=sessions)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        await asyncio.gather(
            *(session(client, url, s, turns=turns, api=api, into=measured) for s in range(sessions))
        )
    return measured


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fleet(version: str, slots: int) -> Iterator[tuple[str, str, int]]:
    """Two emulated Ollama servers of that release, and a gateway before them: (the first
    server's URL, the gateway's, the gateway's process id)."""
    sim = (
        *("sim", "--port", "0", "--port", "0", "--num-parallel", str(slots)),
        *("--ollama-version", version, "--output-tokens", "24-24", "--load-seconds", "0"),
        *("--prefill-tps", "400000", "--decode-tps", "200", "--batch-slowdown", "0"),
    )
    with ExitStack() as stack:
        servers = stack.enter_context(started_process(*sim, cpu=LOAD_CPU))[0][:2]
        backends = [a for url in servers for a in ("--backend", url)]
        serve = ("serve", "--port", "0", *backends, "--slots", str(slots), "--no-log-requests")
        (gateway, *_), pid = stack.enter_context(started_process(*serve, cpu=GATEWAY_CPU))
        yield servers[0], gateway, pid


def p(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="each target this often, in turn")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    slots = max(2, args.sessions)
    results: dict[str, Measured] = {}
    cpu: dict[str, float] = {}

    def measure(label: str, url: str, api: str, pid: int | None = None) -> None:
        before = cpu_seconds(pid) if pid else 0.0
        measured = asyncio.run(run(url, args.sessions, args.turns, api))
        kept = results.setdefault(label, Measured())
        kept.first_token += measured.first_token
        kept.events += measured.events
        if pid:
            cpu[label] = cpu.get(label, 0.0) + cpu_seconds(pid) - before

    with fleet("0.32.6", slots) as (current, through, pid), fleet("0.12.0", slots) as old:
        engine_old, translating, translating_pid = old
        for _ in range(args.rounds):  # interleaved: the machine's noise falls on every target
            measure("messages, direct", current, "messages")
            measure("messages, through the gateway", through, "messages", pid)
            measure("chat completions, through the gateway", through, "chat", pid)
            measure("chat completions, direct (Ollama 0.12)", engine_old, "chat")
            measure("messages, translated by the gateway", translating, "messages", translating_pid)

    print(f"{args.sessions} sessions x {args.turns} turns x {args.rounds} rounds, per target")
    print(f"{'target':<42} {'TTFT p50 ms':>12} {'p99 ms':>8} {'events':>7} {'CPU us/event':>13}")
    for label, measured in results.items():
        per_event = f"{cpu[label] / measured.events * 1e6:.1f}" if label in cpu else "-"
        print(
            f"{label:<42} {p(measured.first_token, 50):>12.2f} "
            f"{p(measured.first_token, 99):>8.2f} {measured.events:>7} {per_event:>13}"
        )
    base = p(results["messages, direct"].first_token, 50)
    added = p(results["messages, through the gateway"].first_token, 50) - base
    old_base = p(results["chat completions, direct (Ollama 0.12)"].first_token, 50)
    translated = p(results["messages, translated by the gateway"].first_token, 50) - old_base
    print(f"added TTFT p50: passed through {added:+.2f} ms, translated {translated:+.2f} ms")


if __name__ == "__main__":
    main()
