"""OpenTelemetry traces: a gateway with `otlp_endpoint` sends each model request's spans to a
test OTLP/HTTP receiver on loopback, and the backends get the W3C traceparent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from parallama.config import BackendSettings
from tests.rawhelpers import RawBackend, RawRequest, raw_backend
from tests.simhelpers import eventually, gateway_with

CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
BODY = {"model": "m", "prompt": "hi"}  # streamed (Ollama's default)


def _http(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


PROBE = _http("200 OK", b'{"done":true}')
UNAVAILABLE = _http("503 Service Unavailable", b'{"error":"loading"}')  # tried elsewhere
STREAM = b"".join(
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n",
        *(
            b"%x\r\n%s\r\n" % (len(line), line)
            for line in (
                b'{"response":"a","done":false}\n',
                b'{"response":"b","done":false}\n',
                b'{"done":true,"prompt_eval_count":3,"eval_count":2}\n',
            )
        ),
        b"0\r\n\r\n",
    ]
)


def header(request: RawRequest, name: bytes) -> str | None:
    for line in request.head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode()
    return None


def spans_of(receiver: RawBackend) -> list[dict[str, Any]]:
    found = []
    for request in receiver.requests:
        if request.is_probe:
            continue
        for resource in json.loads(request.body)["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                found += scope["spans"]
    return found


def attribute(span: dict[str, Any], key: str) -> Any:
    for pair in span["attributes"]:
        if pair["key"] == key:
            return next(iter(pair["value"].values()))
    return None


def test_a_request_is_a_trace_of_its_wait_its_attempts_and_its_stream() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], RawBackend, RawBackend, list[int]]:
        async def flaky(request: RawRequest, writer: asyncio.StreamWriter) -> None:
            writer.write(PROBE if request.is_probe else UNAVAILABLE)

        async def good(request: RawRequest, writer: asyncio.StreamWriter) -> None:
            writer.write(PROBE if request.is_probe else STREAM)

        async def collector(request: RawRequest, writer: asyncio.StreamWriter) -> None:
            writer.write(_http("200 OK", b"{}"))

        async with (
            raw_backend(flaky) as first,
            raw_backend(good) as second,
            raw_backend(collector) as receiver,
        ):
            backends = (BackendSettings(url=first.url), BackendSettings(url=second.url))
            settings = {"routing": "round-robin", "otlp_endpoint": f"{receiver.url}/v1/traces"}
            with gateway_with(backends, **settings) as gateway:
                async with httpx.AsyncClient(timeout=30) as client:
                    traced = await client.post(
                        f"{gateway.url}/api/generate",
                        json=BODY,
                        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
                    )
                    unsampled = await client.post(
                        f"{gateway.url}/api/generate",
                        json=BODY,
                        headers={"traceparent": f"00-{'a' * 32}-{'b' * 16}-00"},
                    )
                spans = await asyncio.to_thread(
                    eventually, lambda: spans_of(receiver), lambda found: len(found) >= 5
                )
            return spans, first, second, [traced.status_code, unsampled.status_code]

    spans, first, second, statuses = asyncio.run(scenario())
    assert statuses == [200, 200]
    assert len(spans) == 5  # the unsampled request made none
    by_name = {span["name"]: span for span in spans}
    root = by_name["POST /api/generate"]
    assert {s["traceId"] for s in spans} == {CALLER_TRACE}  # the caller's trace goes on
    assert root["parentSpanId"] == CALLER_SPAN and root["kind"] == 2
    assert attribute(root, "http.response.status_code") == "200"
    assert attribute(root, "gen_ai.usage.output_tokens") == "2"
    assert attribute(root, "parallama.failovers") == "1"
    assert by_name["queue"]["parentSpanId"] == root["spanId"]
    failed = by_name[f"upstream {first.url}"]
    answered = by_name[f"upstream {second.url}"]
    assert failed["parentSpanId"] == answered["parentSpanId"] == root["spanId"]
    assert attribute(failed, "parallama.attempt.outcome") == "failed over"
    assert failed["status"] == {"code": 2}
    assert attribute(answered, "parallama.attempt.outcome") == "answered"
    assert attribute(answered, "parallama.attempt") == "2"
    assert by_name["stream"]["parentSpanId"] == answered["spanId"]
    assert int(answered["startTimeUnixNano"]) >= int(failed["endTimeUnixNano"])
    # Each backend was told of the attempt it served; the unsampled one's context passed as is.
    posts = [r for r in first.requests + second.requests if not r.is_probe]
    sent = [header(r, b"traceparent") for r in posts]
    assert f"00-{CALLER_TRACE}-{failed['spanId']}-01" in sent
    assert f"00-{CALLER_TRACE}-{answered['spanId']}-01" in sent
    assert f"00-{'a' * 32}-{'b' * 16}-00" in sent
