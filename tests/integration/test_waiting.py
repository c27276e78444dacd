"""Honest waiting: every answer says how long it waited in the queue, and a request whose
deadline the queue ahead of it already exceeds is refused at once, not timed out later."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx

from parallama.config import BackendSettings
from parallama.gateway.app import Gateway
from tests.simhelpers import CHAT_MODEL, gateway_with, sim_server, wait_for_gateway

GENERATE = {"model": CHAT_MODEL, "prompt": "hi", "stream": False}
CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}


@contextlib.contextmanager
def one_slot(decode_tps: float, tokens: int, **settings: Any) -> Iterator[Gateway]:
    """A gateway in front of an emulated server with one slot, its answers `tokens` long."""
    with (
        sim_server(decode_tps=decode_tps, output_tokens=(tokens, tokens), num_parallel=1) as slow,
        gateway_with((BackendSettings(url=slow.url, slots=1),), **settings) as gateway,
    ):
        yield gateway


async def fill(client: httpx.AsyncClient, url: str, count: int) -> list[Any]:
    """`count` requests to the one slot: one runs, the others wait (once this returns)."""
    ahead = [
        asyncio.ensure_future(client.post("/api/generate", json=GENERATE)) for _ in range(count)
    ]
    await asyncio.to_thread(
        wait_for_gateway, url, lambda s: s["queue_size"] == count - 1 and s["active"] == 1
    )
    return ahead


def test_answers_carry_their_queue_wait_and_a_hopeless_deadline_is_refused_at_once() -> None:
    with one_slot(decode_tps=40.0, tokens=20) as gateway:  # answers of about half a second
        url = gateway.url
        first = httpx.post(f"{url}/api/generate", json=GENERATE, timeout=30)
        assert first.headers["X-Queue-Wait-Ms"] == "0"  # a free slot: no wait

        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], float]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                ahead = await fill(client, url, 3)
                began = time.monotonic()
                hopeless = await asyncio.gather(
                    client.post(
                        "/api/generate", json=GENERATE, headers={"X-Request-Deadline": "0.3"}
                    ),
                    client.post(
                        "/v1/chat/completions", json=CHAT, headers={"X-Request-Deadline": "0.3"}
                    ),
                )
                refused_in = time.monotonic() - began
                patient = client.post(
                    "/api/generate", json=GENERATE, headers={"X-Request-Deadline": "30"}
                )
                served = await asyncio.gather(patient, *ahead)
                return list(hopeless), served, refused_in

        hopeless, served, refused_in = asyncio.run(scenario())
    ollama, openai = hopeless
    assert (ollama.status_code, openai.status_code) == (503, 503)
    assert refused_in < 0.3  # at once: not after waiting out its deadline
    assert "exceeds the request's deadline of 0.3 s" in ollama.json()["error"]
    assert openai.json()["error"]["message"].startswith("the expected wait of")
    assert int(ollama.headers["Retry-After"]) >= 1
    assert ollama.headers["X-Queue-Wait-Ms"] == "0"
    assert [a.status_code for a in served] == [200] * 4
    patient_wait = int(served[0].headers["X-Queue-Wait-Ms"])
    assert patient_wait > 500  # behind the two that waited before it, at ~0.5 s each


def test_a_deadline_that_is_not_a_positive_number_of_seconds_is_a_400() -> None:
    with (
        sim_server() as sim,
        gateway_with((BackendSettings(url=sim.url),)) as gateway,
    ):
        for bad in ("soon", "0", "-1", "nan", "1e9"):
            answer = httpx.post(
                f"{gateway.url}/api/generate", json=GENERATE, headers={"X-Request-Deadline": bad}
            )
            assert answer.status_code == 400
            assert "X-Request-Deadline" in answer.json()["error"]


CHAT_STREAM = {**CHAT, "stream": True}
UPDATES = {"X-Queue-Updates": "1"}


def test_a_waiting_openai_stream_is_told_its_place_and_the_official_client_reads_on() -> None:
    import openai

    with one_slot(decode_tps=40.0, tokens=40) as gateway:  # answers of about a second
        url = gateway.url

        async def scenario() -> tuple[list[str], str, str]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                ahead = await fill(client, url, 2)
                lines: list[str] = []
                async with client.stream(
                    "POST", "/v1/chat/completions", json=CHAT_STREAM, headers=UPDATES
                ) as answer:
                    kind = answer.headers["content-type"]
                    async for line in answer.aiter_lines():
                        lines.append(line)
                ahead.append(asyncio.ensure_future(client.post("/api/generate", json=GENERATE)))
                await asyncio.to_thread(
                    wait_for_gateway, url, lambda s: s["active"] == 1
                )  # the slot busy again: the official client's stream waits too
                pieces = await asyncio.to_thread(
                    lambda: openai.OpenAI(
                        base_url=f"{url}/v1", api_key="-", max_retries=0
                    ).chat.completions.create(
                        model=CHAT_MODEL,
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                        extra_headers=UPDATES,
                    )
                )
                text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
                await asyncio.gather(*ahead)
                return lines, kind, text

        lines, kind, text = asyncio.run(scenario())
    assert kind.startswith("text/event-stream")
    told = [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(": queued, position")]
    assert told[0] == 2 and told == sorted(told, reverse=True) and told[-1] >= 1
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert all(not line.startswith(":") for line in lines[first_data:])  # told only while waiting
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert text  # the official client skipped the comments and read the answer whole


def test_a_stream_told_of_its_wait_that_times_out_ends_with_an_error_event() -> None:
    import openai

    with one_slot(decode_tps=10.0, tokens=40, queue_timeout=0.5) as gateway:
        url = gateway.url

        async def scenario() -> str:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                busy = asyncio.ensure_future(client.post("/api/generate", json=GENERATE))
                await asyncio.to_thread(wait_for_gateway, url, lambda s: s["active"] == 1)
                client_error = await asyncio.to_thread(told_then_timed_out, url)
                await busy
                return client_error

        def told_then_timed_out(url: str) -> str:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
            stream = client.chat.completions.create(
                model=CHAT_MODEL,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_headers=UPDATES,
            )
            try:
                list(stream)
            except openai.APIError as raised:
                return str(raised)
            return "no error"

        message = asyncio.run(scenario())
        status = wait_for_gateway(url, lambda s: s["timed_out"] == 1)
    assert "timed out after 0.5 s waiting in the queue" in message
    assert status["timed_out"] == 1
