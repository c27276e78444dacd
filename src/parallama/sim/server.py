"""`parallama sim`: an HTTP server that speaks Ollama's API with Ollama's concurrency semantics.

One `SimServer` is one emulated `ollama serve`: its own scheduler, models and port. Several can
share a process and an event loop (`run_servers`). Native routes live here; the OpenAI-compatible
routes in `openai_routes`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from parallama.errors import ApiError
from parallama.protocol import ollama
from parallama.protocol.hosts import host_allowed
from parallama.protocol.inspect import dialect_of, error_body, parse_json_object
from parallama.protocol.ollama import normalize_name
from parallama.runtime import http_url
from parallama.sim.answers import (
    PlannedAnswer,
    chat_prompt,
    context_ids,
    generate_prompt,
    plan_answer,
)
from parallama.sim.catalog import ModelSpec
from parallama.sim.config import SimConfig
from parallama.sim.engine import Engine, Generation
from parallama.sim.requests import Body, option_int
from parallama.sim.scheduler import Admission, RunnerState, ServerBusyError, runner_rows
from parallama.sim.text import count_tokens, embedding, normalise

log = logging.getLogger("parallama.sim")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 64 * 1024 * 1024
STATE_PATH = "/_sim/state"


@dataclass(frozen=True)
class Job:
    """A validated generation request and the answer it will get."""

    spec: ModelSpec
    body: Body
    prompt: str
    prompt_tokens: int
    answer: PlannedAnswer


def refuse_thinking(body: Body) -> None:
    """The emulated models have no thinking capability; Ollama refuses `think: true` for them."""
    if body.data.get("think") is True:
        raise ApiError(400, f'"{body.model()}" does not support thinking')


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


class SimServer:
    """One emulated Ollama server."""

    def __init__(self, config: SimConfig, port: int) -> None:
        self.config = config
        self.requested_port = port
        self.port = port
        self.models: dict[str, ModelSpec] = {m.name: m for m in config.models}
        self.started_at = time.time()
        self.outcomes: Counter[str] = Counter()
        self.connections_accepted = 0
        self.requests_by_route: Counter[str] = Counter()
        self._engine: Engine | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "server not started"
        return self._engine

    @property
    def url(self) -> str:
        return http_url(self.config.host, self.port)

    def make_app(self) -> web.Application:
        from parallama.sim.openai_routes import add_openai_routes

        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_get("/", self.root)  # aiohttp adds HEAD for GET routes
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_post("/api/embeddings", self.embeddings)
        add_openai_routes(app, self)
        app.router.add_get(STATE_PATH, self.state)
        return app

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._engine = Engine(
            self.config.scheduler,
            self.config.timing,
            # Ollama forces one slot for embedding models.
            slots_for={m.name: 1 for m in self.config.models if m.is_embedding},
        )
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        protocol_factory = self._runner.server
        assert protocol_factory is not None

        def counting_factory() -> asyncio.Protocol:
            self.connections_accepted += 1
            return protocol_factory()

        self._server = await loop.create_server(
            counting_factory, self.config.host, self.requested_port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._engine is not None:
            self._engine.close()

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse foreign Host headers; render errors as Ollama does (JSON in the route's
        dialect, Go's plain texts for 404/405)."""
        if not host_allowed(self.config.host, request.headers.get("Host", "")):
            return web.Response(status=403)
        if request.method == "POST":
            self.requests_by_route[request.path] += 1
        try:
            return await handler(request)
        except ApiError as exc:
            return self.error_response(request, exc)
        except web.HTTPRequestEntityTooLarge:
            return self.error_response(request, ApiError(413, "request body too large"))
        except web.HTTPNotFound:
            return web.Response(text=ollama.NOT_FOUND_TEXT, status=404)
        except web.HTTPMethodNotAllowed:
            return web.Response(text=ollama.METHOD_NOT_ALLOWED_TEXT, status=405)
        except asyncio.CancelledError:
            self.outcomes["cancelled"] += 1
            raise

    def error_response(self, request: web.Request, exc: ApiError) -> web.Response:
        self.outcomes["rejected_busy" if exc.status == 503 else "error"] += 1
        body = error_body(dialect_of(request.path), exc.status, exc.message)
        return web.Response(body=body, status=exc.status, content_type="application/json")

    # -- shared pieces --------------------------------------------------------------------------

    async def read_body(self, request: web.Request, struct: str) -> Body:
        return Body(parse_json_object(await request.read()), struct)

    def find_model(self, name: str) -> ModelSpec:
        spec = self.models.get(normalize_name(name))
        if spec is None:
            raise ApiError(404, ollama.model_not_found(name))
        return spec

    @asynccontextmanager
    async def admitted(
        self, spec: ModelSpec, body: Body, *, needs_slot: bool = True
    ) -> AsyncIterator[Admission]:
        """Wait for the scheduler to give this request its runner and slot."""
        num_ctx = option_int(body.options(), "num_ctx")
        try:
            async with self.engine.admitted(
                spec.name, keep_alive=body.keep_alive(), num_ctx=num_ctx, needs_slot=needs_slot
            ) as ticket:
                yield ticket
        except ServerBusyError:
            raise ApiError(503, ollama.SERVER_BUSY) from None

    def job(
        self, spec: ModelSpec, body: Body, prompt: str, prompt_tokens: int, *, openai: bool = False
    ) -> Job:
        """Plan a generation: the prompt as the model sees it (cut to `num_ctx`) and its answer."""
        options = body.options()
        num_ctx = option_int(options, "num_ctx")
        if num_ctx:
            prompt_tokens = min(prompt_tokens, num_ctx)
        if openai:  # Ollama maps `max_tokens` (only) to num_predict
            num_predict = body.get("max_tokens", int, -1)
        else:
            requested = option_int(options, "num_predict")
            num_predict = -1 if requested is None else requested
        answer = plan_answer(
            model=spec.name,
            prompt=prompt,
            num_predict=num_predict if num_predict >= 0 else None,
            request_seed=body.get("seed", int, 0) if openai else option_int(options, "seed"),
            server_seed=self.config.seed,
            length_range=self.config.output_tokens,
        )
        return Job(spec, body, prompt, prompt_tokens, answer)

    def now_text(self) -> str:
        return ollama.rfc3339(time.time())

    # -- native routes --------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text=ollama.ROOT_TEXT)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.config.version})

    def model_details(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": spec.family,
            "families": [spec.family],
            "parameter_size": spec.parameter_size,
            "quantization_level": spec.quantization_level,
        }

    async def tags(self, request: web.Request) -> web.Response:
        modified = ollama.rfc3339(self.started_at)
        models = [
            {
                "name": spec.name,
                "model": spec.name,
                "modified_at": modified,
                "size": spec.size,
                "digest": spec.digest,
                "details": self.model_details(spec),
            }
            for spec in self.models.values()
        ]
        return json_response({"models": models})

    async def ps(self, request: web.Request) -> web.Response:
        rows = []
        for runner in runner_rows(self.engine.scheduler.loaded()):
            spec = self.models[runner.model]
            expires = runner.expires_at
            if expires is None:  # busy, or kept forever: Ollama shows now + keep-alive
                expires = self.engine.now() + min(runner.keep_alive, ollama.FOREVER_SECONDS)
            rows.append(
                {
                    "name": spec.name,
                    "model": spec.name,
                    "size": spec.size,
                    "digest": spec.digest,
                    "details": self.model_details(spec),
                    "expires_at": ollama.rfc3339(self.engine.wall_time(expires)),
                    "size_vram": spec.size,
                    "context_length": runner.num_ctx,
                }
            )
        return json_response({"models": rows})

    async def show(self, request: web.Request) -> web.Response:
        body = await self.read_body(request, "ShowRequest")
        spec = self.find_model(body.model(old_field="name"))
        arch = spec.family
        return json_response(
            {
                "license": "",
                "modelfile": f"# Modelfile generated by parallama sim\nFROM {spec.name}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": self.model_details(spec),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": int(
                        float(spec.parameter_size[:-1])
                        * (1e9 if spec.parameter_size.endswith("B") else 1e6)
                    ),
                    f"{arch}.context_length": spec.context_length,
                    f"{arch}.embedding_length": spec.embedding_length,
                },
                "capabilities": spec.capabilities,
                "modified_at": ollama.rfc3339(self.started_at),
            }
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_body(request, "GenerateRequest")
        spec = self.find_model(body.model())
        if spec.is_embedding:
            raise ApiError(400, f'"{body.model()}" does not support generate')
        prompt_text = body.get("prompt", str, "")
        if not prompt_text:
            return await self.load_or_unload(spec, body, {"response": ""})
        context = body.get("context", list, [])
        system, raw = body.get("system", str, ""), body.get("raw", bool, False)
        template = body.get("template", str, "")
        if raw and (system or context or template):
            raise ApiError(400, "raw mode does not support template, system, or context")
        refuse_thinking(body)
        job = self.job(spec, body, *generate_prompt(prompt_text, system, context, raw))

        def chunk(token: str) -> dict[str, Any]:
            return {
                "model": spec.name,
                "created_at": self.now_text(),
                "response": token,
                "done": False,
            }

        def final(stats: dict[str, Any]) -> dict[str, Any]:
            answer = job.answer
            ids = context_ids(job.prompt, answer.text, job.prompt_tokens, len(answer.tokens))
            return {"done_reason": answer.done_reason, "context": ids, **stats}

        return await self.respond(request, job, chunk, final)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_body(request, "ChatRequest")
        spec = self.find_model(body.model())
        if spec.is_embedding:
            raise ApiError(400, f'"{body.model()}" does not support chat')
        messages = body.get("messages", list, [])
        refuse_thinking(body)
        if not all(isinstance(message, dict) for message in messages):
            raise ApiError(400, "json: cannot unmarshal messages: each must be an object")
        if not messages:
            empty = {"message": {"role": "assistant", "content": ""}}
            return await self.load_or_unload(spec, body, empty)
        job = self.job(spec, body, *chat_prompt(messages))

        def chunk(token: str) -> dict[str, Any]:
            message = {"role": "assistant", "content": token}
            return {
                "model": spec.name,
                "created_at": self.now_text(),
                "message": message,
                "done": False,
            }

        def final(stats: dict[str, Any]) -> dict[str, Any]:
            return {"done_reason": job.answer.done_reason, **stats}

        return await self.respond(request, job, chunk, final)

    async def respond(
        self,
        request: web.Request,
        job: Job,
        chunk: Callable[[str], dict[str, Any]],
        final: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> web.StreamResponse:
        """Run a generation and answer as NDJSON chunks, or as one object when not streaming."""
        stream = job.body.get("stream", bool, True)
        stats = Generation()
        response: web.StreamResponse | None = None
        async with self.admitted(job.spec, job.body) as ticket:
            tokens = self.engine.generate(ticket, job.prompt_tokens, job.answer.tokens, stats)
            if stream:
                response = web.StreamResponse(headers={"Content-Type": ollama.NDJSON})
                await response.prepare(request)
                async for token in tokens:
                    await response.write(orjson.dumps(chunk(token)) + b"\n")
            else:
                async for _ in tokens:
                    pass
        last = chunk("" if stream else job.answer.text)
        last["done"] = True
        statistics = ollama.final_statistics(
            total=self.engine.now() - ticket.arrived_at,
            load=stats.load,
            prompt_eval_count=job.prompt_tokens,
            prompt_eval=stats.prompt_eval,
            eval_count=len(job.answer.tokens),
            eval_=stats.eval,
        )
        last.update(final(statistics))
        self.outcomes["completed"] += 1
        if response is None:
            return json_response(last)
        await response.write(orjson.dumps(last) + b"\n")
        await response.write_eof()
        return response

    async def preload_or_unload(self, spec: ModelSpec, body: Body) -> str:
        """An empty prompt, messages or input: load the model, or with `keep_alive: 0` unload
        it, as Ollama does. Returns the `done_reason` ("load" or "unload")."""
        if body.keep_alive() == 0:
            self.engine.unload(spec.name)
            reason = "unload"
        else:
            async with self.admitted(spec, body, needs_slot=False):
                pass
            reason = "load"
        self.outcomes["completed"] += 1
        return reason

    async def load_or_unload(
        self, spec: ModelSpec, body: Body, empty: dict[str, Any]
    ) -> web.Response:
        reason = await self.preload_or_unload(spec, body)
        return json_response(
            {
                "model": spec.name,
                "created_at": self.now_text(),
                **empty,
                "done_reason": reason,
                "done": True,
            }
        )

    async def embed_vectors(
        self, spec: ModelSpec, body: Body, inputs: list[str]
    ) -> tuple[list[list[float]], int, Generation, float]:
        """Spend the prefill time of `inputs` in a slot and return their vectors."""
        truncate = body.get("truncate", bool, True)
        options = body.options()
        limit = option_int(options, "num_ctx") or min(
            spec.context_length, self.config.scheduler.default_num_ctx
        )
        counts = []
        for text in inputs:
            n = count_tokens(text)
            if n > limit and not truncate:
                raise ApiError(400, "input length exceeds maximum context length")
            counts.append(min(n, limit))
        dimensions = body.get("dimensions", int, 0)
        if dimensions < 0 or dimensions > spec.embedding_length:
            raise ApiError(400, f"dimensions must be between 1 and {spec.embedding_length}")
        stats = Generation()
        async with self.admitted(spec, body) as ticket:
            await self.engine.prefill(ticket, sum(counts), stats)
        vectors = [embedding(spec.name, text, spec.embedding_length) for text in inputs]
        if dimensions:
            vectors = [normalise(v[:dimensions]) for v in vectors]
        total = self.engine.now() - ticket.arrived_at
        self.outcomes["completed"] += 1
        return vectors, sum(counts), stats, total

    async def embed(self, request: web.Request) -> web.Response:
        body = await self.read_body(request, "EmbedRequest")
        spec = self.find_model(body.model())
        raw = body.data.get("input")
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = raw
        elif raw is None:
            inputs = []
        else:
            raise ApiError(400, "invalid input type")
        if not inputs:
            await self.preload_or_unload(spec, body)
            return json_response({"model": spec.name, "embeddings": []})
        vectors, prompt_tokens, stats, total = await self.embed_vectors(spec, body, inputs)
        return json_response(
            {
                "model": spec.name,
                "embeddings": vectors,
                **ollama.final_statistics(
                    total=total,
                    load=stats.load,
                    prompt_eval_count=prompt_tokens,
                    prompt_eval=0.0,
                    eval_count=0,
                    eval_=0.0,
                ),
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        """Legacy `/api/embeddings`: one `prompt` in, one `embedding` out."""
        body = await self.read_body(request, "EmbeddingRequest")
        spec = self.find_model(body.model())
        prompt = body.get("prompt", str, "")
        if not prompt:
            await self.preload_or_unload(spec, body)
            return json_response({"embedding": []})
        vectors, _, _, _ = await self.embed_vectors(spec, body, [prompt])
        return json_response({"embedding": vectors[0]})

    # -- emulator-only --------------------------------------------------------------------------

    async def state(self, request: web.Request) -> web.Response:
        """Not part of Ollama: what tests and capacity planners want to see inside."""
        scheduler = self.engine.scheduler
        models = [
            {
                "name": r.model,
                "state": "loading" if r.state is RunnerState.LOADING else "ready",
                "slots": r.slots,
                "busy": r.busy_slots,
                "waiting": len(r.waiting),
                "draining": r.draining,
                "num_ctx": r.num_ctx,
            }
            for r in scheduler.loaded()
        ]
        return json_response(
            {
                "pending": len(scheduler.pending),
                "models": models,
                "unloads": scheduler.unloads,
                "connections_accepted": self.connections_accepted,
                "requests_by_route": dict(self.requests_by_route),
                "outcomes": dict(self.outcomes),
            }
        )
