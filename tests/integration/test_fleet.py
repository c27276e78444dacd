"""Fleet behaviour against real emulated backends on loopback: a backend dying mid-burst, model
inventories, model affinity, backends that reset or say "server busy", drain and reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from parallama.config import BackendSettings
from parallama.gateway.http.upstream import DROPPED
from parallama.protocol.ollama import SERVER_BUSY
from tests.rawhelpers import RawRequest, raw_backend
from tests.simhelpers import (
    CHAT_MODEL,
    EMBED_MODEL,
    OTHER_MODEL,
    burst,
    eventually,
    gateway_for,
    gateway_from_file,
    gateway_status,
    gateway_with,
    make_config,
    model_state,
    sim_servers,
    state,
    wait_for_gateway,
    wait_for_state,
)

FAST_HEALTH = {"health_interval": 0.1, "failure_threshold": 2, "breaker_cooldown": 0.5}


def backend_row(status: dict[str, Any], url: str) -> dict[str, Any]:
    return next(b for b in status["backends"] if b["url"] == url)


def completed(url: str) -> int:
    return int(state(url)["outcomes"].get("completed", 0))


def test_a_backend_dying_mid_burst_loses_no_request_and_its_breaker_closes_on_return() -> None:
    config = make_config(num_parallel=2, decode_tps=400, output_tokens=(20, 20))
    with sim_servers(replace(config, ports=(0, 0))) as survivors, ExitStack() as victim:
        victim_url = victim.enter_context(sim_servers(config))[0].url
        port = int(victim_url.rsplit(":", 1)[1])
        urls = [s.url for s in survivors] + [victim_url]
        with gateway_with(tuple(BackendSettings(url=u) for u in urls), **FAST_HEALTH) as gateway:

            async def scenario() -> list[int]:
                running = asyncio.ensure_future(burst(gateway.url, 100))
                await asyncio.to_thread(
                    wait_for_state, victim_url, lambda s: model_state(s, CHAT_MODEL)["busy"] > 0
                )
                await asyncio.to_thread(victim.close)  # it stops
                return await running

            codes = asyncio.run(scenario())
            status = wait_for_gateway(
                gateway.url, lambda s: backend_row(s, victim_url)["breaker"] == "open"
            )
            assert codes == [200] * 100
            assert status["completed"] == 100
            assert status["failed"] == status["queued"] == status["active"] == 0
            with sim_servers(replace(config, ports=(port,))):  # it comes back
                back = wait_for_gateway(
                    gateway.url, lambda s: backend_row(s, victim_url)["breaker"] == "closed"
                )
                assert backend_row(back, victim_url)["healthy"] is True
                assert asyncio.run(burst(gateway.url, 6)) == [200] * 6


def test_each_request_lands_only_where_its_model_is_installed() -> None:
    placement = {CHAT_MODEL: 0, OTHER_MODEL: 1, EMBED_MODEL: 2}
    with ExitStack() as stack:
        servers = [
            stack.enter_context(sim_servers(make_config(num_parallel=4, models=(model,))))[0]
            for model in placement
        ]
        with gateway_for(servers, **FAST_HEALTH) as gateway:
            wait_for_gateway(
                gateway.url, lambda s: all(b["installed"] is not None for b in s["backends"])
            )
            for model in placement:
                assert asyncio.run(burst(gateway.url, 8, model)) == [200] * 8
            missing = httpx.post(f"{gateway.url}/api/generate", json={"model": "absent:1b"})
        outcomes = [state(s.url)["outcomes"] for s in servers]
    for model, index in placement.items():
        assert outcomes[index] == {"completed": 8}, model
    assert missing.status_code == 404
    assert missing.json() == {"error": "model 'absent:1b' not found"}


@pytest.mark.parametrize(("concurrency", "spread"), [(2, False), (12, True)])
def test_model_affinity_keeps_a_model_on_one_backend_until_it_is_saturated(
    concurrency: int, spread: bool
) -> None:
    config = make_config(num_parallel=2, decode_tps=400, output_tokens=(20, 20), load_seconds=0.2)
    with (
        sim_servers(replace(config, ports=(0, 0))) as servers,
        gateway_for(servers, routing="model-affinity", **FAST_HEALTH) as gateway,
    ):
        for _ in range(3):
            assert asyncio.run(burst(gateway.url, concurrency)) == [200] * concurrency
        loaded = [model_state(state(s.url), CHAT_MODEL)["state"] != "unloaded" for s in servers]
    assert loaded.count(True) == (2 if spread else 1)


@pytest.mark.parametrize("room_told", [True, False])
def test_model_affinity_told_the_room_evicts_no_models_only_copy_to_spill(room_told: bool) -> None:
    """Two engines that keep one model each, one holding each model: a burst for the first
    model waits for its engine rather than evict the other's only copy, once the gateway knows
    the room (unknown, it spills there, and the engine unloads the other model)."""
    config = make_config(
        max_loaded_models=1, models=(CHAT_MODEL, OTHER_MODEL), decode_tps=200, ports=2
    )
    with sim_servers(config) as servers:
        for server, model in zip(servers, (CHAT_MODEL, OTHER_MODEL), strict=True):
            load = {"model": model, "prompt": ""}
            assert httpx.post(f"{server.url}/api/generate", json=load).status_code == 200
        room = {"max_loaded_models": 1} if room_told else {}
        backends = tuple(BackendSettings(url=s.url, **room) for s in servers)
        with gateway_with(backends, routing="model-affinity", **FAST_HEALTH) as gateway:
            wait_for_gateway(
                gateway.url, lambda s: all(len(b["loaded"]) == 1 for b in s["backends"])
            )
            assert asyncio.run(burst(gateway.url, 6)) == [200] * 6
        unloads = [state(s.url)["unloads"] for s in servers]
    assert unloads == ([0, 0] if room_told else [0, 1])


@asynccontextmanager
async def scripted_backend(
    answer: bytes | list[bytes | None] | None,
    saw: Callable[[bytes], None] | None = None,
    *,
    work: float = 0.0,
) -> AsyncIterator[str]:
    """A backend that reads a request, works `work` seconds, and sends `answer`, or (None)
    closes without a word; a list gives the answers to its requests in turn, the last one
    repeated (the requests being POSTs: probes get the answer of the next one). `saw` is told
    each request line."""
    answers = answer if isinstance(answer, list) else [answer]
    served = 0

    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        nonlocal served
        if saw is not None:
            saw(request.line)
        chosen = answers[min(served, len(answers) - 1)]
        served += not request.is_probe  # probes do not move the script on
        await asyncio.sleep(work)  # the engine at work (part of the scenario)
        if chosen is None:
            return False
        writer.write(chosen)
        return True

    async with raw_backend(reply) as backend:
        yield backend.url


BUSY = b'{"error":"%s"}' % SERVER_BUSY.encode()
BUSY_ANSWER = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
BUSY_ANSWER += b"Content-Length: %d\r\n\r\n%s" % (len(BUSY), BUSY)


@pytest.mark.parametrize("answer", [None, BUSY_ANSWER], ids=["reset", "server-busy"])
def test_a_failure_before_the_first_byte_moves_the_request_to_another_backend(
    answer: bytes | None,
) -> None:
    async def scenario() -> tuple[httpx.Response, dict[str, Any], str]:
        async with scripted_backend(answer, work=0.3) as broken:
            with (
                sim_servers(make_config()) as servers,
                # round-robin, the broken backend first: the first request goes there
                gateway_with(
                    (BackendSettings(url=broken), BackendSettings(url=servers[0].url)),
                    routing="round-robin",
                ) as gateway,
            ):
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                    body = {"model": CHAT_MODEL, "prompt": "hi", "stream": False}
                    reply = await client.post("/api/generate", json=body)
                    status = (await client.get("/parallama/status")).json()
                    metrics = (await client.get("/metrics")).text
            return reply, status, metrics

    reply, status, metrics = asyncio.run(scenario())
    assert reply.status_code == 200
    assert reply.json()["done"] is True
    assert (status["completed"], status["failed"]) == (1, 0)
    broken_row = status["backends"][0]
    assert f'parallama_failovers_total{{backend="{broken_row["url"]}"}} 1.0' in metrics
    if answer is not None:  # "server busy" halves its slots for a while
        assert broken_row["capacity"] == 1 and broken_row["slots"] == 1
    # It never waited for a slot: the 0.3 s on the failed backend is no queue wait.
    waited = next(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("parallama_queue_wait_seconds_sum")
    )
    assert waited < 0.15


def test_the_last_backend_failing_gives_a_clear_502() -> None:
    async def scenario() -> httpx.Response:
        async with scripted_backend(None) as broken:
            with gateway_with((BackendSettings(url=broken),), retries=2) as gateway:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                    return await client.post("/api/chat", json={"model": CHAT_MODEL})

    reply = asyncio.run(scenario())
    assert reply.status_code == 502
    assert reply.json()["error"].endswith(DROPPED)


OK_ANSWER = b'{"model":"%s","response":"hi","done":true}' % CHAT_MODEL.encode()
OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(OK_ANSWER),
    OK_ANSWER,
)
GENERATE = {"model": CHAT_MODEL, "prompt": "hi", "stream": False}


def test_a_request_that_engines_drop_goes_to_one_other_engine_at_most() -> None:
    """An engine that crashes on a prompt must not see it again, and the prompt must not take
    down every engine in turn: two tries in all, and a 502 that says what happened."""
    seen: list[list[bytes]] = [[], [], []]

    async def scenario() -> tuple[httpx.Response, dict[str, Any]]:
        async with (
            scripted_backend(None, seen[0].append) as a,
            scripted_backend(None, seen[1].append) as b,
            scripted_backend(None, seen[2].append) as c,
        ):
            backends = tuple(BackendSettings(url=url) for url in (a, b, c))
            with gateway_with(backends, routing="round-robin", retries=2) as gateway:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                    reply = await client.post("/api/generate", json=GENERATE)
                    return reply, (await client.get("/parallama/status")).json()

    reply, status = asyncio.run(scenario())
    assert reply.status_code == 502
    message = reply.json()["error"]
    assert message.count("closed the connection while processing this request") == 2
    assert "could not be reached" not in message
    assert "not tried on another" in message
    posts = [[line for line in lines if line.startswith(b"POST")] for lines in seen]
    assert sorted(len(requests) for requests in posts) == [0, 1, 1]
    assert (status["failed"], status["completed"]) == (1, 0)


def test_a_dropped_request_is_not_sent_again_on_a_reused_connection() -> None:
    """The backend answered once (its connection is pooled), then read the next request, worked
    on it (a second: no keep-alive race, where a backend closes a connection before it reads
    what comes) and dropped the connection: it receives that request once, not twice."""
    seen: list[bytes] = []

    async def scenario() -> tuple[list[int], str]:
        async with scripted_backend([OK_ANSWER, None], seen.append, work=1.0) as backend:
            with gateway_with((BackendSettings(url=backend),)) as gateway:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                    first = await client.post("/api/generate", json=GENERATE)
                    second = await client.post("/api/generate", json=GENERATE)
                    return [first.status_code, second.status_code], second.json()["error"]

    codes, error = asyncio.run(scenario())
    assert codes == [200, 502]
    assert len([line for line in seen if line.startswith(b"POST")]) == 2
    assert error.endswith(DROPPED)


def write_config(path: Path, backends: list[dict[str, Any]], **top: Any) -> None:
    """A TOML file: JSON's strings, numbers and booleans are TOML's too."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in top.items()]
    for backend in backends:
        lines.append("[[backends]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in backend.items()]
    path.write_text("\n".join(lines) + "\n")


def reload(url: str) -> httpx.Response:
    return httpx.post(f"{url}/parallama/reload", timeout=10)


def test_drain_add_and_remove_by_reload_mid_burst_lose_nothing(tmp_path: Path) -> None:
    config = make_config(num_parallel=2, decode_tps=400, output_tokens=(20, 20))
    path = tmp_path / "parallama.toml"
    with sim_servers(replace(config, ports=(0, 0, 0))) as servers:
        a, b, c = (s.url for s in servers)
        write_config(path, [{"url": a}, {"url": b}], port=0, health_interval=0.1)
        with gateway_from_file(path) as gateway:

            async def scenario() -> tuple[list[int], httpx.Response]:
                running = asyncio.ensure_future(burst(gateway.url, 60))
                await asyncio.to_thread(
                    wait_for_state, a, lambda s: model_state(s, CHAT_MODEL)["busy"] > 0
                )
                write_config(path, [{"url": a, "drain": True}, {"url": b}, {"url": c}], port=0)
                answer = await asyncio.to_thread(reload, gateway.url)
                return await running, answer

            codes, answer = asyncio.run(scenario())
            assert answer.status_code == 200
            assert set(answer.json()["changes"]) == {f"changed {a}", f"added {c}"}
            assert codes == [200] * 60
            drained = wait_for_gateway(gateway.url, lambda s: backend_row(s, a)["active"] == 0)
            assert backend_row(drained, a)["draining"] is True
            on_a = completed(a)
            assert asyncio.run(burst(gateway.url, 12)) == [200] * 12
            assert completed(a) == on_a  # drained: nothing new
            assert completed(c) > 0  # added: in use

            write_config(path, [{"url": b}, {"url": c}], port=0)
            assert reload(gateway.url).json()["changes"] == [f"removed {a}"]
            write_config(path, [{"url": b, "slots": 0}], port=0)
            refused = reload(gateway.url)
            status = gateway_status(gateway.url)
    assert refused.status_code == 400
    assert "backends.0.slots" in refused.json()["error"]
    assert [row["url"] for row in status["backends"]] == [b, c]  # the running config stayed
    assert status["total"] == status["completed"] == 72


def test_an_alias_is_sent_to_the_backends_as_its_target_model() -> None:
    models = {"gpt-4o": {"target": CHAT_MODEL}}
    with sim_servers(make_config()) as servers, gateway_for(servers, models=models) as gateway:
        reply = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        loaded = [m["name"] for m in state(servers[0].url)["models"]]
    assert reply.status_code == 200
    assert loaded == [CHAT_MODEL]


def test_admin_routes_need_the_token_when_one_is_set() -> None:
    with sim_servers(make_config()) as servers, gateway_for(servers, admin_token="s3cret") as gw:
        anonymous = httpx.post(f"{gw.url}/parallama/reload")
        wrong = httpx.post(f"{gw.url}/parallama/reload", headers={"Authorization": "Bearer x"})
        right = httpx.post(f"{gw.url}/parallama/reload", headers={"Authorization": "Bearer s3cret"})
    assert anonymous.status_code == wrong.status_code == 401
    assert "admin_token" in anonymous.json()["error"]
    # Past the check: this gateway has no file to read again, and says so.
    assert right.status_code == 400
    assert "settings it can read again" in right.json()["error"]


def test_an_engine_that_answers_every_path_alike_still_gets_every_model() -> None:
    """Its `/api/tags` says nothing about models: the gateway must not take it for 'none'."""
    done = b'{"done":true}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    answer += b"Content-Length: %d\r\n\r\n%s" % (len(done), done)

    async def scenario() -> httpx.Response:
        asked: list[bytes] = []
        probed = asyncio.Event()  # a whole probe went by, and the next one began

        def saw(line: bytes) -> None:
            asked.append(line.split(b" ")[1])
            if asked[-2:] == [b"/api/ps", b"/api/version"]:
                probed.set()

        async with scripted_backend(answer, saw) as engine:
            with gateway_with((BackendSettings(url=engine),), **FAST_HEALTH) as gateway:
                await asyncio.wait_for(probed.wait(), 10)
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                    return await client.post("/api/generate", json={"model": "any:1b"})

    reply = asyncio.run(scenario())
    assert reply.status_code == 200
    assert reply.json() == {"done": True}


def test_session_affinity_keeps_each_growing_conversation_on_one_backend() -> None:
    config = make_config(num_parallel=4)
    with (
        sim_servers(replace(config, ports=(0, 0, 0))) as servers,
        gateway_for(servers, routing="session-affinity") as gateway,
    ):
        chats = [[{"role": "user", "content": f"hello from chat {n}"}] for n in range(6)]
        for turn in range(3):
            for messages in chats:  # interleaved, one request at a time
                reply = httpx.post(
                    f"{gateway.url}/api/chat",
                    json={"model": CHAT_MODEL, "messages": messages, "stream": False},
                    timeout=10,
                )
                assert reply.status_code == 200
                messages += [reply.json()["message"], {"role": "user", "content": f"{turn}?"}]
        served = [completed(s.url) for s in servers]
    # Each chat's three turns on one backend, and the chats spread over several backends
    # (least-loaded would put all 18 where the model is loaded).
    assert all(count % 3 == 0 for count in served)
    assert sum(count > 0 for count in served) > 1


@pytest.mark.parametrize(
    ("routing", "finds_its_history"), [("prefix-affinity", True), ("least-loaded", False)]
)
def test_prefix_affinity_sends_each_turn_to_the_backend_that_holds_its_history(
    routing: str, finds_its_history: bool
) -> None:
    """Two one-slot engines without a RAM prompt cache (as the gateway is told), two
    conversations with different system prompts, their first turns at once (one on each
    engine), then their second turns at once in the other order: least-loaded sends each to
    the engine holding the other's history, prefix affinity to its own, where the whole first
    exchange is found cached."""
    config = replace(
        make_config(decode_tps=20, output_tokens=(20, 20), models=(CHAT_MODEL,), ports=2),
        cache_ram_mib=0,
    )
    chats = {
        name: [
            {"role": "system", "content": f"You are {name}'s assistant. " * 30},
            {"role": "user", "content": f"Hello, I am {name}."},
        ]
        for name in ("ann", "bob")
    }
    with (
        sim_servers(config) as servers,
        gateway_with(
            tuple(BackendSettings(url=s.url, prompt_cache_ram=0) for s in servers),
            routing=routing,
            slots=1,
        ) as gateway,
    ):

        async def ask(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
            body = {"model": CHAT_MODEL, "messages": chats[name], "stream": False}
            answer: dict[str, Any] = (
                await client.post(f"{gateway.url}/api/chat", json=body)
            ).json()
            chats[name] += [answer["message"], {"role": "user", "content": "And then?"}]
            return answer

        async def turn(first: str, second: str) -> list[dict[str, Any]]:
            async with httpx.AsyncClient(timeout=30) as client:
                leading = asyncio.ensure_future(ask(client, first))
                await asyncio.to_thread(  # the first is on an engine: the other one is free
                    wait_for_gateway, gateway.url, lambda s: s["in_flight"] == 1
                )
                return list(await asyncio.gather(leading, ask(client, second)))

        firsts = asyncio.run(turn("ann", "bob"))
        assert all(state(s.url)["prompt_tokens"] for s in servers)  # one on each engine
        before = sum(state(s.url)["cached_tokens"][CHAT_MODEL] for s in servers)
        asyncio.run(turn("bob", "ann"))  # the other order: least-loaded swaps them
        cached = sum(state(s.url)["cached_tokens"][CHAT_MODEL] for s in servers) - before
    history = sum(a["prompt_eval_count"] + a["eval_count"] for a in firsts)
    if finds_its_history:
        assert cached >= history - 4  # each first exchange, but for a token or two of the turn's
    else:
        assert cached < history / 10  # the other's slot: the template and "You are" at most


def test_the_gateway_learns_each_loaded_models_kv_size_from_ollama_once() -> None:
    """Prefix affinity counts what an engine's RAM prompt cache holds in the model's own tokens:
    the probes ask Ollama's `/api/show` once per loaded model."""
    big = "llama3.1:8b"
    config = make_config(models=(CHAT_MODEL, big))
    with sim_servers(config) as (server,), gateway_for([server], health_interval=0.02) as gateway:
        assert gateway.scheduler.kv_bytes(CHAT_MODEL) is None
        for model in (CHAT_MODEL, big):
            body = {"model": model, "prompt": "hi", "stream": False}
            assert httpx.post(f"{gateway.url}/api/generate", json=body).status_code == 200
        learnt = eventually(
            lambda: (gateway.scheduler.kv_bytes(CHAT_MODEL), gateway.scheduler.kv_bytes(big)),
            lambda sizes: None not in sizes,
        )
        for keep_alive in (0, -1):  # unloaded, then loaded again: each seen in another probe
            body = {"model": big, "prompt": "", "keep_alive": keep_alive}
            assert httpx.post(f"{server.url}/api/generate", json=body).status_code == 200
            wait_for_gateway(
                gateway.url, lambda s, k=keep_alive: (big in s["backends"][0]["loaded"]) == (k != 0)
            )
        asked = state(server.url)["requests_by_route"]["/api/show"]
    assert learnt == (28 * 4 * 256 * 2, 32 * 8 * 256 * 2)  # 56 and 128 KiB a token
    assert asked == 2
