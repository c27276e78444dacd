"""What one emulated Ollama server does whichever dialect asks: its models, its scheduler and
engine (`engine.py`), and the answers it plans. The routes of both dialects (`ollama_routes.py`,
`openai_routes.py`) use it, so that a request costs the same time in either, as in Ollama, whose
OpenAI routes translate to its native handlers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from parallama.errors import ApiError
from parallama.protocol import ollama
from parallama.protocol.bodies import parse_json_object
from parallama.protocol.ollama import normalize_name
from parallama.sim.answers import PlannedAnswer, Tokens, plan_answer
from parallama.sim.catalog import ModelSpec
from parallama.sim.config import SimConfig
from parallama.sim.engine import Engine, Generation
from parallama.sim.prompt_cache import ram_tokens
from parallama.sim.requests import Body, option_int
from parallama.sim.scheduler import Admission, ServerBusyError
from parallama.sim.text import count_tokens, embedding, normalise


@dataclass(frozen=True)
class Job:
    """A validated generation request and the answer it will get."""

    spec: ModelSpec
    body: Body
    prompt: str
    prompt_ids: Tokens  # the prompt's tokens as the model sees them (after truncation)
    answer: PlannedAnswer

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def refuse_thinking(body: Body) -> None:
    """The emulated models have no thinking capability; Ollama refuses `think: true` for them."""
    if body.data.get("think") is True:
        raise ApiError(400, f'"{body.model()}" does not support thinking')


class Emulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.models: dict[str, ModelSpec] = {m.name: m for m in config.models}
        self.blobs: dict[str, int] = {}  # uploaded: digest to size (the bytes are not kept)
        self.started_at = time.time()
        self.outcomes: Counter[str] = Counter()
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "server not started"
        return self._engine

    def start(self) -> None:
        """The engine (it needs the running event loop)."""
        self._engine = Engine(
            self.config.scheduler,
            self.config.timing,
            # Ollama forces one slot for embedding models.
            slots_for={m.name: 1 for m in self.config.models if m.is_embedding},
            ram_tokens_for={
                m.name: ram_tokens(m, self.config.cache_ram_mib) for m in self.config.models
            },
            cache_rule=self.config.prompt_cache,
        )

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.close()

    async def read_body(self, request: web.Request, struct: str) -> Body:
        return Body(parse_json_object(await request.read()), struct)

    def find_model(self, name: str) -> ModelSpec:
        spec = self.models.get(normalize_name(name))
        if spec is None:
            raise ApiError(404, ollama.model_not_found(name))
        return spec

    def details(self, spec: ModelSpec) -> dict[str, Any]:
        return ollama.model_details(spec.family, spec.parameter_size, spec.quantization_level)

    def now_text(self) -> str:
        return ollama.rfc3339(time.time())

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
        self, spec: ModelSpec, body: Body, prompt: str, prompt_ids: Tokens, *, openai: bool = False
    ) -> Job:
        """Plan a generation: the prompt as the model sees it (cut to `num_ctx`) and its answer."""
        options = body.options()
        num_ctx = option_int(options, "num_ctx")
        if num_ctx:
            prompt_ids = prompt_ids[-num_ctx:]  # the end is kept, as Ollama truncates
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
        return Job(spec, body, prompt, prompt_ids, answer)

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
