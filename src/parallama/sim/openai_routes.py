"""The emulator's OpenAI-compatible routes, shaped as Ollama's `openai` middleware answers.

Ollama serves these by translating to its native handlers; here they share the same scheduler,
answers and timing, so a request costs the same whichever dialect it comes in.
"""

from __future__ import annotations

import base64
import itertools
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from parallama.errors import ApiError
from parallama.protocol import openai
from parallama.sim.answers import chat_prompt, generate_prompt
from parallama.sim.engine import Generation

if TYPE_CHECKING:
    from parallama.sim.server import Job, SimServer

FINGERPRINT = "fp_ollama"
_ids = itertools.count(1)


def _usage(job: Job) -> dict[str, int]:
    completion = len(job.answer.tokens)
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
    }


def _header(completion_id: str, model: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }


def add_openai_routes(app: web.Application, server: SimServer) -> None:
    routes = OpenAIRoutes(server)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/embeddings", routes.embeddings)
    app.router.add_get("/v1/models", routes.list_models)
    app.router.add_get("/v1/models/{model:.+}", routes.retrieve_model)


class OpenAIRoutes:
    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_body(request, "ChatCompletionRequest")
        spec = self.server.find_model(body.model())
        messages = body.get("messages", list, [])
        if not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        if not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "invalid message format")
        if spec.is_embedding:
            raise ApiError(400, f'"{body.model()}" does not support chat')
        job = self.server.job(spec, body, *chat_prompt(messages), openai=True)
        header = _header(f"chatcmpl-{next(_ids)}", spec.name)

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**header, "object": "chat.completion.chunk", "choices": [choice]}

        def whole() -> dict[str, Any]:
            message = {"role": "assistant", "content": job.answer.text}
            choice = {"index": 0, "message": message, "finish_reason": job.answer.done_reason}
            return {
                **header,
                "object": "chat.completion",
                "choices": [choice],
                "usage": _usage(job),
            }

        return await self._run(request, job, chunk, whole)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_body(request, "CompletionRequest")
        spec = self.server.find_model(body.model())
        raw_prompt = body.get("prompt", str, "")  # Ollama takes a string only (its issue #5259)
        if spec.is_embedding:
            raise ApiError(400, f'"{body.model()}" does not support generate')
        job = self.server.job(
            spec, body, *generate_prompt(raw_prompt, "", [], raw=False), openai=True
        )
        header = _header(f"cmpl-{next(_ids)}", spec.name)

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = {"text": text, "index": 0, "finish_reason": finish}
            return {**header, "object": "text_completion", "choices": [choice]}

        def whole() -> dict[str, Any]:
            return {**chunk(job.answer.text, job.answer.done_reason), "usage": _usage(job)}

        return await self._run(request, job, chunk, whole)

    async def _run(
        self,
        request: web.Request,
        job: Job,
        chunk: Callable[[str, str | None], dict[str, Any]],
        whole: Callable[[], dict[str, Any]],
    ) -> web.StreamResponse:
        """Generate, then answer as SSE (`data: …`, `data: [DONE]`) or as one JSON object."""
        server = self.server
        stream = job.body.get("stream", bool, False)
        include_usage = bool(job.body.get("stream_options", dict, {}).get("include_usage"))
        stats = Generation()
        async with server.admitted(job.spec, job.body) as ticket:
            tokens = server.engine.generate(ticket, job.prompt_tokens, job.answer.tokens, stats)
            if not stream:
                async for _ in tokens:
                    pass
                server.outcomes["completed"] += 1
                return web.Response(body=orjson.dumps(whole()), content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": openai.EVENT_STREAM})
            await response.prepare(request)
            async for token in tokens:
                await response.write(openai.sse_event(chunk(token, None)))
        last = chunk("", job.answer.done_reason)
        await response.write(openai.sse_event(last))
        if include_usage:
            await response.write(openai.sse_event({**last, "choices": [], "usage": _usage(job)}))
        await response.write(openai.SSE_DONE)
        await response.write_eof()
        server.outcomes["completed"] += 1
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self.server.read_body(request, "EmbedRequest")
        spec = self.server.find_model(body.model())
        raw = body.data.get("input")
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            inputs = raw
        else:
            raise ApiError(400, "invalid input: expected a string or a non-empty array of strings")
        encoding = body.get("encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"invalid encoding_format {encoding!r}: use 'float' or 'base64'")
        vectors, prompt_tokens, _, _ = await self.server.embed_vectors(spec, body, inputs)
        data = [
            {"object": "embedding", "embedding": _encode(v, encoding), "index": i}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        payload = {"object": "list", "data": data, "model": spec.name, "usage": usage}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    def _model_entry(self, name: str) -> dict[str, Any]:
        owner = name.split("/", maxsplit=1)[0] if "/" in name else "library"
        return {
            "id": name,
            "object": "model",
            "created": int(self.server.started_at),
            "owned_by": owner,
        }

    async def list_models(self, request: web.Request) -> web.Response:
        data = [self._model_entry(name) for name in self.server.models]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def retrieve_model(self, request: web.Request) -> web.Response:
        spec = self.server.find_model(request.match_info["model"])
        return web.Response(
            body=orjson.dumps(self._model_entry(spec.name)), content_type="application/json"
        )


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
