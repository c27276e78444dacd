"""End to end on a real model: SmolLM2-135M on two llama.cpp `llama-server`s (one thread and
two slots each) started by `parallama up --demo-real`, with the official `ollama`, `openai` and
`anthropic` clients in front, as a user would run them.

Needs a llama-server and the model: `parallama llama-server --smollm2` finds or builds and
fetches them once (the README's test command runs it first); without them these tests are
skipped, unless PARALLAMA_REQUIRE_E2E=1 (as `scripts/test` sets it) turns the skip into a
failure, so that CI cannot pass without running them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import orjson
import pytest

from parallama.bench.trace import TracedRequest, trace_lines
from parallama.launch.engines import SMOLLM2_ALIAS
from parallama.launch.llama_build import find_llama_server, smollm2_path
from parallama.launch.supervisor import describe_exit
from parallama.sim.profiles import read_profile
from tests.launchhelpers import Up, alive, finished, running_up
from tests.simhelpers import wait_for_gateway

MODEL = SMOLLM2_ALIAS
ASK = "Why is the sky blue? Answer in one sentence."
QUESTION = [{"role": "user", "content": ASK}]
SHORT = {"num_predict": 24}

if find_llama_server() is None:
    MISSING = "no llama-server (on PATH, or built here)"
elif smollm2_path() is None:
    MISSING = "no SmolLM2-135M GGUF file"
else:
    MISSING = ""
if MISSING and os.environ.get("PARALLAMA_REQUIRE_E2E") == "1":
    raise RuntimeError(f"end-to-end tests required but {MISSING}: parallama llama-server --smollm2")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "ready")
Runs = dict[str, tuple[int, int | None]]  # each instance's restarts and last exit status


def demo_real(log: Path, *flags: str) -> Any:
    """`parallama up --demo-real`: its engines on free ports, as the gateway's `--port 0` is;
    prefix affinity, so that a conversation's turns find their prompt cached."""
    return running_up(
        "--demo-real", "--health-interval", "0.5", "--routing", "prefix-affinity", *flags,
        log=log, ready_within=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with demo_real(tmp_path_factory.mktemp("up") / "up.log") as running:
        yield running


@pytest.fixture
def up(demo: Up) -> Iterator[Up]:
    """The demo, for one test; that no engine died during it is checked after it (as an error
    of its own, beside the test's failure if it failed too: a 502 then has its cause)."""
    with engines_checked(demo):
        yield demo


@contextmanager
def engines_checked(up: Up, spared: Collection[str] = ()) -> Iterator[None]:
    """Fail, naming the engine and quoting its log file, if an engine other than `spared`
    died or restarted while the block ran; a failure in the block stays its cause."""
    before = engine_runs(up)
    try:
        yield
    except Exception as failure:
        death = engine_deaths(up, before, spared)
        if death:
            raise AssertionError(death) from failure
        raise
    death = engine_deaths(up, before, spared)
    if death:
        raise AssertionError(death)


def engine_runs(up: Up) -> Runs:
    """Each instance's restarts and last exit status, from the gateway's status."""
    instances = httpx.get(f"{up.url}/parallama/status", timeout=10).json()["instances"]
    return {i["name"]: (i["restarts"], i["last_exit"]) for i in instances}


def engine_deaths(up: Up, before: Runs, spared: Collection[str]) -> str:
    """What died since `before`, as the user needs to hear it; "" if nothing did."""
    if up.process.poll() is not None:
        ended = describe_exit(up.process.returncode)
        return f"parallama up exited ({ended}); its log ends:\n{up.log.read_text()[-3000:]}"
    try:
        instances = httpx.get(f"{up.url}/parallama/status", timeout=10).json()["instances"]
    except httpx.HTTPError as exc:
        return f"the gateway does not answer its status: {exc}"
    deaths = [
        engine_death(instance)
        for instance in instances
        if instance["name"] not in spared
        and (instance["restarts"], instance["last_exit"]) != before.get(instance["name"])
    ]
    return "\n".join(deaths)


def engine_death(instance: dict[str, Any]) -> str:
    code = instance["last_exit"]
    how = "did not exit" if code is None else f"died with {describe_exit(code)}"
    log = Path(instance["log"])
    return (
        f"engine {instance['name']} {how} (state {instance['state']}, restarts "
        f"{instance['restarts']}, last error {instance['last_error']}); its last output, from "
        f"{log}:\n    " + "\n    ".join(last_run(log, instance["name"]))
    )


def last_run(log: Path, name: str, lines: int = 30) -> list[str]:
    """The end of the engine's last run that ended (parallama marks where each begins and
    ends), rather than the start of the run that replaced it."""
    if not log.exists():
        return ["(no log file)"]
    text = log.read_text(errors="replace").splitlines()
    ends = [i for i, line in enumerate(text) if line.startswith(f"--- parallama: {name} ended")]
    last = ends[-1] + 1 if ends else len(text)
    return text[max(0, last - lines) : last]


def test_the_ollama_client_chats_with_the_real_model(up: Up) -> None:
    client = ollama.Client(host=up.url, timeout=60)
    assert MODEL in {m.model for m in client.list().models}

    reply = client.chat(model=MODEL, messages=QUESTION, options=SHORT)
    assert reply.message.role == "assistant"
    assert len(reply.message.content or "") > 10
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.eval_count and 0 < reply.eval_count <= 24
    assert reply.prompt_eval_count and reply.prompt_eval_count > 5  # the real tokenizer's count

    chunks = list(client.chat(model=MODEL, messages=QUESTION, options=SHORT, stream=True))
    assert len(chunks) > 3
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert len("".join(c.message.content or "" for c in chunks)) > 10

    generated = client.generate(model=MODEL, prompt="The capital of France is", options=SHORT)
    assert generated.response and generated.done


def test_the_openai_client_chats_with_the_real_model(up: Up) -> None:
    client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", timeout=60)
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": ASK}], max_tokens=24
    )
    assert len(completion.choices[0].message.content or "") > 10
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 24

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": ASK}], max_tokens=24, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3
    assert len("".join(pieces)) > 10


def test_calibrate_replay_and_plan_on_the_real_engine(up: Up, tmp_path: Path) -> None:
    """The planning loop a user runs: a profile measured on one real engine, a trace replayed
    through the gateway with answers held to their traced lengths, the same trace planned."""
    calibrated = finished(
        "plan", "--calibrate", up.url, "--api", "openai", "--out", str(tmp_path / "smollm2.toml"),
        timeout=300,
    )  # fmt: skip
    assert calibrated.returncode == 0, calibrated.stderr
    profiles = [tmp_path / "smollm2-1.toml", tmp_path / "smollm2-2.toml"]  # an engine each
    for written in profiles:
        timing = read_profile(written)
        assert timing.prefill_tps > timing.decode_tps > 0  # a prompt token costs less to make
    profile = profiles[0]
    trace = [TracedRequest(n * 0.5, MODEL, 30 + 15 * n, 8 + 2 * n) for n in range(8)]
    trace_file = tmp_path / "trace.jsonl"
    trace_file.write_bytes(b"".join(trace_lines(trace)))
    measured_file, planned_file = tmp_path / "run.json", tmp_path / "plan.json"
    replayed = finished(
        "bench", up.url, "--api", "openai", "--replay", str(trace_file),
        "--json", str(measured_file), timeout=300,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    (measured,) = orjson.loads(measured_file.read_bytes())["summaries"]
    assert measured["ok"] == 8
    # Held to length: llama-server reads `ignore_eos`.
    traced = sum(t.generated_tokens for t in trace)
    assert measured["output_tokens"] == traced
    planned = finished(
        "plan", "--replay", str(trace_file), "--profile", str(profile), "--instances", "2",
        "--json", str(planned_file),
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    (predicted,) = orjson.loads(planned_file.read_bytes())["summaries"]
    assert predicted["ok"] == 8 and predicted["output_tokens"] == traced  # the trace's, exactly


def test_a_body_sent_as_curl_sends_it_still_reaches_the_engine_as_json(up: Up) -> None:
    """curl's `-d` says application/x-www-form-urlencoded; an engine may refuse it."""
    body = orjson.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 8})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = httpx.post(f"{up.url}/v1/chat/completions", content=body, headers=form, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]


def test_bad_input_gets_ollamas_error_from_the_real_engine_path(up: Up) -> None:
    reply = httpx.post(
        f"{up.url}/api/chat", json={"model": MODEL, "messages": [{"content": "x"}]}, timeout=30
    )
    assert (reply.status_code, reply.json()) == (400, {"error": "each message needs a role"})


def test_killing_a_server_mid_run_loses_no_request_that_had_not_started_streaming(
    tmp_path: Path,
) -> None:
    with demo_real(tmp_path / "up.log") as up, engines_checked(up, spared={"llama-server-0"}):
        victim = httpx.get(f"{up.url}/parallama/status").json()["instances"][0]
        assert victim["name"] == "llama-server-0"
        results: dict[int, Any] = {}

        def ask(n: int) -> None:
            body = {"model": MODEL, "messages": QUESTION, "options": SHORT, "stream": n % 4 == 3}
            lines: list[dict[str, Any]] = []
            try:
                with httpx.stream("POST", f"{up.url}/api/chat", json=body, timeout=120) as reply:
                    results[n] = (reply.status_code, lines)
                    lines.extend(httpx_json_lines(reply))
            except httpx.HTTPError as exc:
                results[n] = (0, [{"error": str(exc)}])

        clients = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
        for client in clients:
            client.start()
        # Every slot busy: then one server dies in the middle of its generations.
        wait_for_gateway(up.url, lambda s: s["in_flight"] == 4, timeout=60)
        os.kill(int(victim["pid"]), signal.SIGKILL)
        for client in clients:
            client.join(120)

        for n, (status, lines) in sorted(results.items()):
            streamed = n % 4 == 3
            started = any("message" in line for line in lines)
            if not streamed or not started:
                assert status == 200, (n, status, lines)
                assert lines[-1].get("done") is True, (n, lines)
        assert len(results) == 8

        status = wait_for_gateway(
            up.url,
            lambda s: s["instances"][0]["restarts"] == 1 and s["instances"][0]["state"] == "ready",
            timeout=60,
        )
        assert alive(int(status["instances"][0]["pid"]))
        # The request the victim was working on moved to the other server, or, if it was a
        # stream that had begun, ended with an error line: nothing else failed.
        failovers = failovers_of(up.url)
        assert failovers + status["failed"] >= 1
        assert status["failed"] <= 2
        wait_for_gateway(up.url, lambda s: all(b["healthy"] for b in s["backends"]), timeout=30)
        after = ollama.Client(host=up.url, timeout=60).chat(
            model=MODEL, messages=QUESTION, options=SHORT
        )
        assert after.done


def httpx_json_lines(reply: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in reply.iter_lines():
        if line.strip():
            yield orjson.loads(line)


def backend_requests(url: str) -> dict[str, float]:
    """The requests the gateway sent each backend, from its metrics."""
    sent: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("parallama_backend_requests_total{"):
            backend = line.split('backend="', 1)[1].split('"', 1)[0]
            sent[backend] = sent.get(backend, 0) + float(line.rsplit(" ", 1)[1])
    return sent


def failovers_of(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("parallama_failovers_total")
    )


def test_autoscaling_starts_a_real_engine_for_the_first_request_and_stops_it_when_idle(
    tmp_path: Path,
) -> None:
    """From zero: no llama.cpp server runs until a chat waits; the chat waits in the queue
    while the engine loads SmolLM2, is answered, and the idle engine is stopped again."""
    config = tmp_path / "up.toml"
    config.write_text(
        "health_interval = 0.5\n[[instances]]\n"
        f'engine = "llama-server"\nport = 0\nmodel = "{smollm2_path()}"\nalias = "{MODEL}"\n'
        "threads = 1\nctx = 2048\nparallel = 1\n"
        "[instances.autoscale]\nmin = 0\nmax = 1\nidle_after = 2\ncooldown = 1\n"
    )
    with running_up("--config", str(config), log=tmp_path / "up.log", ready_within=120) as up:
        instance = httpx.get(f"{up.url}/parallama/status").json()["instances"][0]
        assert (instance["name"], instance["state"], instance["pid"]) == (
            "llama-server-0.1",
            "stopped",
            None,
        )

        body = {"model": MODEL, "messages": QUESTION, "options": SHORT, "stream": False}
        reply = httpx.post(f"{up.url}/api/chat", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["message"]["content"].strip()
        waited = int(reply.headers["X-Queue-Wait-Ms"])
        assert waited > 0  # for the engine's start, not an error
        instance = httpx.get(f"{up.url}/parallama/status").json()["instances"][0]
        assert instance["state"] == "ready" and alive(int(instance["pid"]))

        status = wait_for_gateway(up.url, lambda s: s["autoscaling"][0]["engines"] == 0, timeout=60)
        assert [d["action"] for d in status["autoscaling"][0]["decisions"]] == ["start", "stop"]
        assert not alive(int(instance["pid"]))


SYSTEM = (
    "You are a coding agent. You read files, run tools and answer in one short sentence. "
    "Tools: read_file(path), run(command), search(query), edit(path, old, new). " * 12
)


def engine_urls(up: Up) -> list[str]:
    return [i["url"] for i in httpx.get(f"{up.url}/parallama/status").json()["instances"]]


def test_a_conversations_next_turn_finds_its_prompt_cached_on_the_engine(up: Up) -> None:
    """Prefix affinity sends a conversation's next turn to the engine whose slot still holds
    its prompt: llama-server's own timings say how much of it came from the cache."""
    client = httpx.Client(base_url=f"{up.url}/v1", timeout=60)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "List files."}]
    first = client.post("/chat/completions", json={"model": MODEL, "messages": messages,
                                                   "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert first.status_code == 200, first.text
    answer = first.json()
    prompt = answer["usage"]["prompt_tokens"]
    assert prompt > 300
    messages += [
        {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Now read the README."},
    ]
    second = client.post(
        "/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
    ).json()
    timings = second["timings"]
    assert timings["cache_n"] >= prompt - 8  # the first turn's prompt, not evaluated again
    assert timings["prompt_n"] < 40  # only what the turn added
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == timings["cache_n"]


def test_the_slots_an_outside_client_holds_are_left_to_it(up: Up) -> None:
    """An engine's /slots tells the gateway what runs there beyond its own requests: while an
    outside client holds both slots of the first engine, the gateway's requests go to the
    other, and none waits behind the outside ones."""
    first, second = engine_urls(up)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=120) as outside, contextlib.ExitStack() as streams:
        for _ in range(2):
            streams.enter_context(outside.stream("POST", f"{first}/v1/chat/completions", json=body))
        status = wait_for_gateway(up.url, lambda s: s["backends"][0]["outside"] == 2, timeout=30)
        assert status["backends"][0]["url"] == first
        before = backend_requests(up.url)
        asked = [
            httpx.post(f"{up.url}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
            for _ in range(3)
        ]  # fmt: skip
        assert [reply.status_code for reply in asked] == [200, 200, 200]
        sent = backend_requests(up.url)
        assert sent.get(first, 0) == before.get(first, 0)  # nothing more to the full engine
        assert sent.get(second, 0) == before.get(second, 0) + 3


def test_the_agents_apis_pass_through_to_the_engine_that_serves_them(up: Up) -> None:
    """llama-server serves the Anthropic Messages and OpenAI Responses APIs itself: the gateway
    finds that out and passes them through (its usage names cached tokens, as only the engine's
    own answer does), whole and streamed, with the SDKs the agents use."""
    claude = anthropic.Anthropic(base_url=up.url, api_key="unused", max_retries=0, timeout=60)
    message = claude.messages.create(
        model=MODEL, max_tokens=8, system=SYSTEM, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.type == "message" and message.content[0].type == "text"
    assert message.usage.output_tokens == 8 and message.stop_reason == "max_tokens"
    again = claude.messages.create(
        model=MODEL, max_tokens=8, system=SYSTEM, messages=[{"role": "user", "content": "Hi"}]
    )
    assert (again.usage.cache_read_input_tokens or 0) > 300  # the engine's own prompt cache
    with claude.messages.stream(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text and stream.get_final_message().usage.output_tokens == 8
    counted = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Hi there"}]
    )
    assert counted.input_tokens > 2  # the engine's tokenizer counted

    codex = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=60)
    response = codex.responses.create(model=MODEL, input="Hi", max_output_tokens=8)
    assert response.status == "completed" and response.output_text
    events = [e.type for e in codex.responses.create(
        model=MODEL, input="Hi", max_output_tokens=8, stream=True
    )]  # fmt: skip
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events


def test_streams_queued_behind_busy_slots_reach_the_engine_without_a_failover(up: Up) -> None:
    """llama-server closes a connection after every streamed answer, though it announces
    `Keep-Alive`: a queued request sent on it as the slot frees must not turn into a failover
    (its prompt evaluated again elsewhere) or, with one engine, a 502."""
    before = failovers_of(up.url)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "stream": True}

    def stream_one(results: list[int]) -> None:
        with httpx.stream("POST", f"{up.url}/v1/chat/completions", json=body, timeout=120) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
            results.append(reply.status_code if lines[-1] == "data: [DONE]" else 0)

    results: list[int] = []
    clients = [threading.Thread(target=stream_one, args=(results,)) for _ in range(12)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(180)
    assert results == [200] * 12  # four slots in all: eight of them waited for one
    assert failovers_of(up.url) == before
