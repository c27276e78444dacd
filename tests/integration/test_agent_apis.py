"""What coding agents speak, through the gateway over emulated Ollama servers, with the official
`anthropic` and `openai` SDKs: the Anthropic Messages API (`/v1/messages`) and OpenAI's
Responses API (`/v1/responses`).

Each test runs twice: in front of a current Ollama, which serves both routes (the gateway passes
the bytes through), and in front of Ollama 0.12, which has neither (the gateway does their work
with its `/v1/chat/completions`). The emulator counts the routes it was asked, so each test also
checks which of the two happened.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from parallama.config import BackendSettings
from parallama.protocol import ollama
from parallama.sim.server import SimServer
from parallama.teams.store import open_store
from tests.dbhelpers import new_key
from tests.rawhelpers import RawRequest, raw_backend
from tests.simhelpers import (
    CHAT_MODEL,
    gateway_for,
    gateway_status,
    gateway_with,
    make_config,
    sim_servers,
    state,
    wait_for_gateway,
    wait_for_state,
)

OLD_OLLAMA = "0.12.0"  # before /v1/responses (0.13.3) and /v1/messages (0.14.0)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
# A 1x1 PNG.
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f8ffff3f0005fe02fea35c8fef0000000049454e44ae426082"
    )
).decode()


@dataclass
class Fleet:
    url: str
    servers: list[SimServer]
    translated: bool

    def routes(self) -> dict[str, int]:
        """Generation routes asked of the emulators, summed over them."""
        counts: dict[str, int] = {}
        for server in self.servers:
            for route, n in state(server.url)["requests_by_route"].items():
                counts[route] = counts.get(route, 0) + n
        return counts

    def served_by(self, route: str, before: dict[str, int]) -> None:
        """The last requests went to `route` at the engines, or (translated) to their chat
        completions, and nothing else."""
        after = self.routes()
        grown = {r for r in after if after[r] > before.get(r, 0)} - {"/api/show"}
        assert grown == ({"/v1/chat/completions"} if self.translated else {route})


@pytest.fixture(scope="module", params=["passed through", "translated"])
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    translated = request.param == "translated"
    version = OLD_OLLAMA if translated else ollama.CURRENT_VERSION
    config = make_config(ports=2, num_parallel=2, output_tokens=(10, 16), version=version)
    with sim_servers(config) as servers, gateway_for(servers, health_interval=0.05) as gateway:
        wait_for_gateway(gateway.url, lambda s: all(b["installed"] for b in s["backends"]))
        yield Fleet(gateway.url, servers, translated)


@pytest.fixture
def claude(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.url, api_key="ollama", max_retries=0)


@pytest.fixture
def oai(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="ollama", max_retries=0)


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# -- the Anthropic Messages API ------------------------------------------------------------------


def test_a_message_whole(fleet: Fleet, claude: anthropic.Anthropic) -> None:
    before = fleet.routes()
    message = claude.messages.create(
        model=CHAT_MODEL, max_tokens=64, system="Be brief.", messages=ask("Why is the sky blue?")
    )
    fleet.served_by("/v1/messages", before)
    assert message.role == "assistant"
    assert message.model == CHAT_MODEL
    assert message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    [block] = message.content
    assert block.type == "text"
    assert block.text.strip()
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens >= 10


def test_a_message_streamed(fleet: Fleet, claude: anthropic.Anthropic) -> None:
    before = fleet.routes()
    with claude.messages.stream(
        model=CHAT_MODEL, max_tokens=64, messages=ask("Tell me about queues.")
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    fleet.served_by("/v1/messages", before)
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert kinds.index("content_block_start") < kinds.index("content_block_stop")
    [block] = final.content
    assert block.type == "text"
    assert block.text.strip()
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens >= 10
    assert final.usage.input_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_round_trip(claude: anthropic.Anthropic, *, stream: bool) -> None:
    messages: list[Any] = ask("What is the weather in Paris?")
    tools: Any = [WEATHER]
    first: Any
    if stream:
        with claude.messages.stream(
            model=CHAT_MODEL, max_tokens=64, tools=tools, messages=messages
        ) as events:
            first = events.get_final_message()
    else:
        first = claude.messages.create(
            model=CHAT_MODEL, max_tokens=64, tools=tools, messages=messages
        )
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather"
    assert isinstance(call.input, dict)
    assert set(call.input) == {"city"}
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}],
        },
    ]
    second = claude.messages.create(model=CHAT_MODEL, max_tokens=64, tools=tools, messages=messages)
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"]
    # The tool's definition and result reached the engine: the prompt grew by them.
    assert second.usage.input_tokens > first.usage.input_tokens > 20


def test_an_image_is_sent_on(claude: anthropic.Anthropic) -> None:
    image = {"type": "base64", "media_type": "image/png", "data": PIXEL}
    content: Any = [
        {"type": "image", "source": image},
        {"type": "text", "text": "What is in this picture?"},
    ]
    message = claude.messages.create(
        model=CHAT_MODEL, max_tokens=32, messages=[{"role": "user", "content": content}]
    )
    assert message.content[0].type == "text"
    assert message.usage.input_tokens > 0


def test_count_tokens_says_no_backend_counts(claude: anthropic.Anthropic) -> None:
    """Ollama has no count_tokens route: a clear 404, in Anthropic's format, not retried."""
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.count_tokens(model=CHAT_MODEL, messages=ask("How many tokens is this?"))
    assert raised.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": f"no backend serving model {CHAT_MODEL!r} counts tokens: Ollama has no "
            "/v1/messages/count_tokens; llama.cpp's llama-server has",
        },
    }
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_messages_errors_are_anthropics_and_bad_input_is_not_retried(
    fleet: Fleet, claude: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model:1b", max_tokens=8, messages=ask("hi"))
    body: Any = missing.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "no-such-model:1b" in body["error"]["message"]
    # Not JSON at all: the gateway's own 400, in Anthropic's format.
    answer = httpx.post(f"{fleet.url}/v1/messages", content=b"{not json", timeout=10)
    assert answer.status_code == 400
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.headers["x-should-retry"] == "false"
    # No model: the SDK's own class for a 400.
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="", max_tokens=8, messages=ask("hi"))


# -- OpenAI's Responses API ------------------------------------------------------------------------

FUNCTION = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": WEATHER["input_schema"],
}


def test_a_response_whole(fleet: Fleet, oai: openai.OpenAI) -> None:
    before = fleet.routes()
    response = oai.responses.create(
        model=CHAT_MODEL, instructions="Be brief.", input="Why is the sky blue?"
    )
    fleet.served_by("/v1/responses", before)
    assert response.status == "completed"
    assert response.model == CHAT_MODEL
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens >= 10
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_a_response_streamed(fleet: Fleet, oai: openai.OpenAI) -> None:
    before = fleet.routes()
    with oai.responses.stream(model=CHAT_MODEL, input="Tell me about queues.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    fleet.served_by("/v1/responses", before)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text
    assert final.output_text.strip()


def test_a_function_call_round_trip(oai: openai.OpenAI) -> None:
    tools: Any = [FUNCTION]
    first = oai.responses.create(model=CHAT_MODEL, input="Weather in Paris?", tools=tools)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert set(orjson.loads(call.arguments)) == {"city"}
    second = oai.responses.create(
        model=CHAT_MODEL,
        tools=tools,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
    )
    assert second.output_text.strip()
    assert not [item for item in second.output if item.type == "function_call"]


def test_responses_errors_are_openais(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.responses.create(model="no-such-model:1b", input="hi")
    assert missing.value.code is None
    assert "no-such-model:1b" in missing.value.message


# -- what the clients ask before they talk ---------------------------------------------------------


def test_the_version_is_the_fleets_and_models_can_be_retrieved(
    fleet: Fleet, oai: openai.OpenAI
) -> None:
    """Codex refuses an Ollama before 0.13.4: the gateway says what its Ollamas are (the
    lowest), but not below the first with the routes it serves in front of any (0.14.0), and
    its own version in a header; `models.retrieve` finds a model."""
    answer = httpx.get(f"{fleet.url}/api/version", timeout=10)
    expected = "0.14.0" if fleet.translated else ollama.CURRENT_VERSION
    assert answer.json() == {"version": expected}
    assert answer.headers["x-parallama-version"]
    status = httpx.get(f"{fleet.url}/parallama/status", timeout=10).json()
    assert status["version"] == answer.headers["x-parallama-version"]
    model = oai.models.retrieve(CHAT_MODEL)
    assert model.id == CHAT_MODEL
    assert model.object == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model:1b")


# -- waiting, refusals and retries ---------------------------------------------------------------


@pytest.fixture
def one_slot() -> Iterator[tuple[str, SimServer]]:
    """A gateway with one slot and room for one waiting request, before a slow engine."""
    config = make_config(decode_tps=40.0, output_tokens=(80, 80))
    with sim_servers(config) as servers:
        settings = {"max_queue": 1, "health_interval": 0.05}
        with gateway_for(servers, **settings) as gateway:
            wait_for_gateway(gateway.url, lambda s: s["backends"][0]["installed"])
            yield gateway.url, servers[0]


@contextmanager
def holding(url: str, streams: int) -> Iterator[threading.Event]:
    """`streams` native chat streams held open through the gateway (each holds a slot, or waits
    for one) until the event is set, or the block ends."""
    release = threading.Event()

    def hold() -> None:
        body = {"model": CHAT_MODEL, "messages": ask("hold the slot"), "stream": True}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", f"{url}/api/chat", json=body),
        ):
            release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(streams)]
    for holder in holders:
        holder.start()
    try:
        yield release
    finally:
        release.set()
        for holder in holders:
            holder.join(10)


@pytest.mark.parametrize("api", ["messages", "responses"])
def test_a_waiting_agent_stream_is_told_it_waits(one_slot: tuple[str, SimServer], api: str) -> None:
    """A streamed Messages request waiting for a slot gets Anthropic's `ping` events, a
    Responses one SSE comments (both skipped by clients), until its answer begins."""
    url, _ = one_slot
    with holding(url, 1) as stop:
        wait_for_gateway(url, lambda s: s["in_flight"] == 1)
        if api == "messages":
            body = {"model": CHAT_MODEL, "max_tokens": 8, "messages": ask("hi"), "stream": True}
            told, first, last = (
                ["event: ping", 'data: {"type":"ping"}'],
                "message_start",
                "message_stop",
            )
        else:
            body = {"model": CHAT_MODEL, "input": "hi", "stream": True}
            told, first, last = [": queued, position 1"], "response.created", "response.completed"
        with httpx.stream("POST", f"{url}/v1/{api}", json=body, timeout=30) as answer:
            assert answer.status_code == 200
            lines = answer.iter_lines()
            assert [next(lines) for _ in told] == told
            stop.set()  # the slot frees: the answer follows
            rest = list(lines)
        events = [line for line in rest if line.startswith("event: ")]
        assert events[0] == f"event: {first}"
        assert events[-1] == f"event: {last}"
        before = rest[: rest.index(f"event: {first}")]
        assert set(before) <= {*told, ""}


def test_a_stream_that_times_out_in_a_short_wait_gets_a_status_to_retry() -> None:
    """Told nothing yet (its wait was under a second), a Messages stream that times out in the
    queue is answered as any request: a status the SDKs retry on, not a 200 with an error."""
    config = make_config(decode_tps=40.0, output_tokens=(80, 80))
    with (
        sim_servers(config) as servers,
        gateway_for(servers, queue_timeout=0.3, health_interval=0.05) as gateway,
    ):
        url = gateway.url
        wait_for_gateway(url, lambda s: s["backends"][0]["installed"])
        with holding(url, 1):
            wait_for_gateway(url, lambda s: s["in_flight"] == 1)
            body = {"model": CHAT_MODEL, "max_tokens": 8, "messages": ask("hi"), "stream": True}
            refused = httpx.post(f"{url}/v1/messages", json=body, timeout=30)
    assert refused.status_code in (503, 504)
    assert refused.headers["x-should-retry"] == "true"
    assert refused.json()["type"] == "error"
    assert "waiting in the queue" in refused.json()["error"]["message"]


def sdk_call(url: str, api: str) -> Any:
    """One call as a coding agent makes it, with the SDK's own retries (two, its default)."""
    if api == "messages":
        claude = anthropic.Anthropic(base_url=url, api_key="x", max_retries=2)
        return claude.messages.create(model=CHAT_MODEL, max_tokens=8, messages=ask("hi"))
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=2)
    return oai.responses.create(model=CHAT_MODEL, input="hi")


@pytest.mark.parametrize("api", ["messages", "responses"])
def test_a_full_queue_is_retried_by_the_sdks_and_then_answered(
    one_slot: tuple[str, SimServer], api: str
) -> None:
    """The SDKs retry a 503 (x-should-retry: true) after its Retry-After: once the queue has
    room, the same call is answered."""
    url, _ = one_slot
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(sdk_call(url, api)))
    with holding(url, 2) as stop:
        wait_for_gateway(url, lambda s: s["in_flight"] == 1 and s["queued"] == 1)
        refused_before = gateway_status(url)["rejected"]
        caller.start()
        wait_for_gateway(url, lambda s: s["rejected"] > refused_before)
        stop.set()  # the queue empties: the SDK's next try gets in
        caller.join(60)
    assert len(result) == 1, "the SDK did not get its answer"
    status = gateway_status(url)
    assert status["rejected"] == refused_before + 1  # refused once, then answered


def test_a_503_says_the_sdks_should_retry(one_slot: tuple[str, SimServer]) -> None:
    url, _ = one_slot
    with holding(url, 2):
        wait_for_gateway(url, lambda s: s["in_flight"] == 1 and s["queued"] == 1)
        body = {"model": CHAT_MODEL, "max_tokens": 8, "messages": ask("hi")}
        refused = httpx.post(f"{url}/v1/messages", json=body, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["x-should-retry"] == "true"
        assert "retry-after" in refused.headers
        assert refused.json()["error"]["type"] == "overloaded_error"
        responses_refused = httpx.post(
            f"{url}/v1/responses", json={"model": CHAT_MODEL, "input": "hi"}, timeout=10
        )
        assert responses_refused.status_code == 503
        assert responses_refused.json()["error"]["type"] == "api_error"


# -- keys and the ledger -------------------------------------------------------------------------


def test_anthropic_clients_key_in_x_api_key_and_the_ledger_counts_their_tokens(
    tmp_path: Path,
) -> None:
    """Claude Code and the anthropic SDK send the key as `x-api-key`: it is the key, its
    limits apply in Anthropic's format, and the ledger has the stream's counts."""
    database = str(tmp_path / "keys.db")
    key = new_key(database, "alice", "--rpm", "2")
    config = make_config(output_tokens=(10, 16))
    with (
        sim_servers(config) as servers,
        gateway_for(servers, auth="keys", database=database) as gateway,
    ):
        claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
        with claude.messages.stream(model=CHAT_MODEL, max_tokens=64, messages=ask("hi")) as s:
            final = s.get_final_message()
        answer = httpx.post(
            f"{gateway.url}/v1/messages",
            json={"model": CHAT_MODEL, "max_tokens": 8, "messages": ask("hi")},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert answer.status_code == 200
        with pytest.raises(anthropic.RateLimitError) as limited:
            claude.messages.create(model=CHAT_MODEL, max_tokens=8, messages=ask("hi"))
        limited_body: Any = limited.value.body
        assert limited_body["error"]["type"] == "rate_limit_error"
        assert limited.value.response.headers["x-should-retry"] == "true"
        with pytest.raises(anthropic.AuthenticationError) as refused:
            anthropic.Anthropic(
                base_url=gateway.url, api_key="pk-wrong", max_retries=0
            ).messages.create(model=CHAT_MODEL, max_tokens=8, messages=ask("hi"))
        refused_body: Any = refused.value.body
        assert refused_body["error"]["type"] == "authentication_error"
    store = open_store(database)
    try:
        streamed, _ = store.answered(0.0, 10)  # the ledger is written when the gateway stops
    finally:
        store.close()
    assert streamed["prompt_tokens"] == final.usage.input_tokens
    assert streamed["generated_tokens"] == final.usage.output_tokens


def test_a_spent_budget_is_not_retried_and_a_model_out_of_bounds_is_refused(
    tmp_path: Path,
) -> None:
    """A limit that lasts past what the SDKs wait for (a day's budget) says
    `x-should-retry: false`: the SDK raises at once, with no try refused again; a model the key
    may not use is the SDK's PermissionDeniedError."""
    database = str(tmp_path / "keys.db")
    key = new_key(database, "bob", "--budget", "10/day", "--models", "qwen2.5*")
    config = make_config(output_tokens=(10, 16))
    with (
        sim_servers(config) as servers,
        gateway_for(servers, auth="keys", database=database) as gateway,
    ):
        claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=2)
        claude.messages.create(model=CHAT_MODEL, max_tokens=16, messages=ask("hi"))  # spends it
        with pytest.raises(anthropic.RateLimitError) as spent:
            claude.messages.create(model=CHAT_MODEL, max_tokens=16, messages=ask("hi"))
        assert spent.value.response.headers["x-should-retry"] == "false"
        assert int(spent.value.response.headers["retry-after"]) > 60
        assert gateway_status(gateway.url)["rejected"] == 1  # tried once, not three times
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            claude.messages.create(model="llama3.2:3b", max_tokens=16, messages=ask("hi"))
        denied_body: Any = denied.value.body
        assert denied_body["error"]["type"] == "permission_error"


def test_a_pattern_alias_serves_the_claude_names_agents_ask_for() -> None:
    """Claude Code asks for its small model by a Claude name: `[models."claude-*"]` maps every
    such name to a model the fleet has."""
    config = make_config(output_tokens=(8, 12))
    models = {"claude-*": {"target": CHAT_MODEL}}
    with sim_servers(config) as servers, gateway_for(servers, models=models) as gateway:
        claude = anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0)
        for name in ("claude-haiku-4-5-20251001", "claude-sonnet-4-5"):
            message = claude.messages.create(model=name, max_tokens=16, messages=ask("hi"))
            assert message.model == CHAT_MODEL  # what ran, as the engine names it
        oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        assert oai.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"
        with pytest.raises(anthropic.NotFoundError):
            claude.messages.create(model="gpt-4o", max_tokens=16, messages=ask("hi"))


def test_an_engine_found_to_serve_the_routes_is_passed_them_and_counts_tokens() -> None:
    """An OpenAI-dialect engine (as llama-server) is asked once whether it has the routes:
    this one has all three, so Messages pass through and count_tokens is answered by it."""
    config = replace(make_config(output_tokens=(8, 12)), count_tokens=True)
    with sim_servers(config) as (engine,):
        backend = BackendSettings(url=engine.url, kind="openai")
        with gateway_with((backend,), health_interval=0.05) as gateway:
            wait_for_gateway(gateway.url, lambda s: s["backends"][0]["installed"])
            claude = anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0)
            messages = ask("How many tokens is this?")
            counted = claude.messages.count_tokens(model=CHAT_MODEL, messages=messages)
            answer = claude.messages.create(model=CHAT_MODEL, max_tokens=16, messages=messages)
        routes = state(engine.url)["requests_by_route"]
    assert counted.input_tokens == answer.usage.input_tokens > 0
    assert routes["/v1/messages/count_tokens"] == 2  # the probe's look, and the count
    assert routes["/v1/messages"] == 2
    assert "/v1/chat/completions" not in routes


# -- failover and cancellation --------------------------------------------------------------------


def _json_answer(payload: Any) -> bytes:
    body = orjson.dumps(payload)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


async def _dies_on_generations(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
    """A current Ollama by its probes, whose engine dies on every generation it is sent."""
    answers = {
        b"GET /api/version": {"version": ollama.CURRENT_VERSION},
        b"GET /api/tags": {"models": [{"name": CHAT_MODEL}]},
        b"GET /api/ps": {"models": []},
    }
    path = request.line.rsplit(b" ", 1)[0]
    if path not in answers:
        return False  # the connection closed before a byte of the answer
    writer.write(_json_answer(answers[path]))
    return True


@pytest.mark.parametrize("stream", [False, True])
def test_a_messages_request_fails_over_before_its_first_byte(*, stream: bool) -> None:
    async def scenario() -> tuple[Any, list[bytes], dict[str, Any]]:
        async with raw_backend(_dies_on_generations) as broken:
            with (
                sim_servers(make_config(output_tokens=(8, 12))) as servers,
                gateway_with(
                    (BackendSettings(url=broken.url), BackendSettings(url=servers[0].url)),
                    routing="round-robin",  # the broken backend first
                    health_interval=0.05,
                ) as gateway,
            ):
                # In a thread: this loop answers the broken backend's probes meanwhile.
                await asyncio.to_thread(
                    wait_for_gateway,
                    gateway.url,
                    lambda s: all(b["healthy"] for b in s["backends"]),
                )
                claude = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="x", max_retries=0)
                message: Any
                if stream:
                    async with claude.messages.stream(
                        model=CHAT_MODEL, max_tokens=16, messages=ask("hi")
                    ) as events:
                        message = await events.get_final_message()
                else:
                    message = await claude.messages.create(
                        model=CHAT_MODEL, max_tokens=16, messages=ask("hi")
                    )
                status = await asyncio.to_thread(gateway_status, gateway.url)
            sent = [r.line for r in broken.requests if not r.is_probe]
        return message, sent, status

    message, sent, status = asyncio.run(scenario())
    assert message.stop_reason == "end_turn"
    # Passed through (it is a current Ollama); once more on a fresh connection if the first
    # went out on a kept one (the keep-alive race, as far as the gateway can tell), then failed
    # over.
    assert set(sent) == {b"POST /v1/messages HTTP/1.1"} and len(sent) <= 2
    assert (status["completed"], status["failed"]) == (1, 0)


@pytest.mark.parametrize("route", ["/v1/messages", "/api/chat"])
def test_a_client_that_leaves_a_stream_cancels_it_and_is_counted(
    tmp_path: Path, route: str
) -> None:
    """The engine stops generating for it, and the ledger counts what was relayed till then:
    an Anthropic stream's own counts so far are its `message_start`'s (0 generated), an
    Ollama stream's none (they come at its end). (The server cancels the request's task when
    its client leaves: before, that skipped the count, and a key's token limits with it.)"""
    config = make_config(decode_tps=20.0, output_tokens=(200, 200))
    database = str(tmp_path / "ledger.db")
    with (
        sim_servers(config) as (engine,),
        gateway_for([engine], ledger="on", database=database, health_interval=0.05) as gateway,
    ):
        wait_for_gateway(gateway.url, lambda s: s["backends"][0]["installed"])
        body = {"model": CHAT_MODEL, "max_tokens": 300, "messages": ask("hi"), "stream": True}
        with httpx.stream("POST", gateway.url + route, json=body, timeout=30) as answer:
            tokens = 0
            for line in answer.iter_lines():
                tokens += line == "event: content_block_delta" or '"done":false' in line
                if tokens == 3:
                    break
        # Closed after three tokens: the engine stops generating for it.
        wait_for_state(engine.url, lambda s: s["outcomes"].get("cancelled") == 1)
        status = wait_for_gateway(gateway.url, lambda s: s["in_flight"] == 0)
    assert status["cancelled"] == 1
    store = open_store(database)
    try:
        [row] = store.usage(0.0, ["outcome"])
    finally:
        store.close()
    assert row["outcome"] == "cancelled"
    assert row["prompt_tokens"] > 0
    assert row["generated_tokens"] >= 3
