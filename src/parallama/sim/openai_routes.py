"""The emulator's OpenAI-compatible routes, shaped as Ollama's `openai` middleware answers.

Ollama serves these by translating to its native handlers; here they share the same `Emulator`
(scheduler, answers and timing), so a request costs the same whichever dialect it comes in.
"""

from __future__ import annotations

import base64
import itertools
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from parallama.errors import ApiError, excerpt
from parallama.protocol import openai
from parallama.protocol.chat_events import AnswerWriter
from parallama.sim.answers import chat_prompt, generate_prompt, tool_call
from parallama.sim.emulator import Emulator, Job, json_response
from parallama.sim.engine import Generation
from parallama.sim.requests import Body

_ids = itertools.count(1)


def _usage(job: Job) -> dict[str, int]:
    return openai.usage(job.prompt_tokens, len(job.answer.tokens))


class OpenAIRoutes:
    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.emulator.read_body(request, "ChatCompletionRequest")
        return await self.chat(request, body)

    async def chat(
        self, request: web.Request, body: Body, answer: AnswerWriter | None = None
    ) -> web.StreamResponse:
        """A chat completion; with `answer`, written in another API (`agent_routes.py`), as
        Ollama's middleware turns its chat answers into Anthropic's or the Responses API's."""
        spec = self.emulator.find_model(body.model())
        messages = body.get("messages", list, [])
        if not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        if not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "invalid message format")
        if spec.is_embedding:
            raise ApiError(400, f'"{body.model()}" does not support chat')
        tools = body.get("tools", list, [])
        job = self.emulator.job(spec, body, *chat_prompt(messages, tools), openai=True)
        header = openai.completion_header(f"chatcmpl-{next(_ids)}", spec.name, int(time.time()))
        call = tool_call(tools, messages, job.answer)
        calls = [] if call is None else [_openai_call(call)]
        done_reason = "tool_calls" if calls else job.answer.done_reason

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            if calls:  # the call whole, in the last chunk, as Ollama streams it
                text = ""
            event = openai.chat_chunk(header, text, finish and done_reason)
            if calls and finish:
                event["choices"][0]["delta"]["tool_calls"] = calls
            return event

        def whole() -> dict[str, Any]:
            text = "" if calls else job.answer.text
            completion = openai.chat_completion(header, text, done_reason, _usage(job))
            if calls:
                completion["choices"][0]["message"]["tool_calls"] = calls
            return completion

        return await self._run(request, job, chunk, whole, answer, quiet=bool(calls))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.emulator.read_body(request, "CompletionRequest")
        spec = self.emulator.find_model(body.model())
        raw_prompt = body.get("prompt", str, "")  # Ollama takes a string only (its issue #5259)
        if spec.is_embedding:
            raise ApiError(400, f'"{body.model()}" does not support generate')
        job = self.emulator.job(
            spec, body, *generate_prompt(raw_prompt, "", [], raw=False), openai=True
        )
        header = openai.completion_header(f"cmpl-{next(_ids)}", spec.name, int(time.time()))

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return openai.text_completion(header, text, finish)

        def whole() -> dict[str, Any]:
            answer = job.answer
            return {**chunk(answer.text, answer.done_reason), "usage": _usage(job)}

        return await self._run(request, job, chunk, whole)

    async def _run(
        self,
        request: web.Request,
        job: Job,
        chunk: Callable[[str, str | None], dict[str, Any]],
        whole: Callable[[], dict[str, Any]],
        answer: AnswerWriter | None = None,
        *,
        quiet: bool = False,
    ) -> web.StreamResponse:
        """Generate, then answer as SSE (`data: …`, `data: [DONE]`) or as one JSON object; with
        `answer`, in its API. `quiet`: the tokens are not streamed (a tool call's, sent whole
        at the end)."""
        emulator = self.emulator
        stream = job.body.get("stream", bool, False)
        include_usage = bool(job.body.get("stream_options", dict, {}).get("include_usage"))
        written = (lambda data: data) if answer is None else answer.feed
        stats = Generation()
        async with emulator.admitted(job.spec, job.body) as ticket:
            tokens = emulator.engine.generate(ticket, job.prompt_ids, job.answer.tokens, stats)
            if not stream:
                async for _ in tokens:
                    pass
                emulator.outcomes["completed"] += 1
                if answer is None:
                    return json_response(whole())
                return _json_bytes(answer.whole(orjson.dumps(whole())))
            response = web.StreamResponse(headers={"Content-Type": openai.EVENT_STREAM})
            await response.prepare(request)
            async for token in tokens:
                if not quiet:
                    await response.write(written(openai.sse_event(chunk(token, None))))
        last = chunk("", job.answer.done_reason)
        await response.write(written(openai.sse_event(last)))
        if include_usage:
            usage = openai.sse_event({**last, "choices": [], "usage": _usage(job)})
            await response.write(written(usage))
        await response.write(written(openai.SSE_DONE))
        if answer is not None:
            await response.write(answer.end())
        await response.write_eof()
        emulator.outcomes["completed"] += 1
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self.emulator.read_body(request, "EmbedRequest")
        spec = self.emulator.find_model(body.model())
        raw = body.data.get("input")
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            inputs = raw
        else:
            raise ApiError(400, "invalid input: expected a string or a non-empty array of strings")
        encoding = body.get("encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            given = excerpt(repr(encoding))
            raise ApiError(400, f"invalid encoding_format {given}: use 'float' or 'base64'")
        vectors, prompt_tokens, _, _ = await self.emulator.embed_vectors(spec, body, inputs)
        data = [
            {"object": "embedding", "embedding": _encode(v, encoding), "index": i}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return json_response({"object": "list", "data": data, "model": spec.name, "usage": usage})

    async def list_models(self, request: web.Request) -> web.Response:
        created = int(self.emulator.started_at)
        data = [openai.model_entry(name, created) for name in self.emulator.models]
        return json_response({"object": "list", "data": data})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        spec = self.emulator.find_model(request.match_info["model"])
        return json_response(openai.model_entry(spec.name, int(self.emulator.started_at)))


def _json_bytes(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    function = {"name": call["name"], "arguments": orjson.dumps(call["arguments"]).decode()}
    return {"index": 0, "id": f"call_{next(_ids)}", "type": "function", "function": function}


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
