"""`parallama sim`: an HTTP server that speaks Ollama's API with Ollama's concurrency semantics.

One `SimServer` is one emulated `ollama serve` on its own port: an `Emulator` (its models,
scheduler and answers) behind the routes of both dialects (`ollama_routes.py`,
`openai_routes.py`), with Ollama's Host check and error rendering around them, and
`/_sim/state` for tests and capacity planners. Several can share a process and an event loop
(`run.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from parallama.errors import ApiError
from parallama.protocol import anthropic, ollama
from parallama.protocol.hosts import host_allowed
from parallama.protocol.inspect import dialect_of, error_body
from parallama.protocol.responses import RESPONSES
from parallama.runtime import http_url, system_backlog
from parallama.sim.agent_routes import AgentRoutes
from parallama.sim.config import SimConfig
from parallama.sim.emulator import Emulator, json_response
from parallama.sim.engine import Engine
from parallama.sim.manage import ModelManagement
from parallama.sim.ollama_routes import OllamaRoutes
from parallama.sim.openai_routes import OpenAIRoutes
from parallama.sim.scheduler import RunnerState

log = logging.getLogger("parallama.sim")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 64 * 1024 * 1024
STATE_PATH = "/_sim/state"

_TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{%- endfor %}<|im_start|>assistant\n"
)


class SimServer:
    """One emulated Ollama server."""

    def __init__(self, config: SimConfig, port: int) -> None:
        self.config = config
        self.requested_port = port
        self.port = port
        self.emulator = Emulator(config)
        self.connections_accepted = 0
        self.requests_by_route: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @property
    def engine(self) -> Engine:
        return self.emulator.engine

    @property
    def url(self) -> str:
        return http_url(self.config.host, self.port)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        native, compatible = OllamaRoutes(self.emulator), OpenAIRoutes(self.emulator)
        agents = AgentRoutes(self.emulator, compatible)
        manage = ModelManagement(self.emulator)
        for method, path, handler in (
            ("GET", "/", native.root),  # aiohttp adds HEAD to GET routes, as Ollama has it
            ("GET", "/api/version", native.version),
            ("GET", "/api/tags", native.tags),
            ("GET", "/api/ps", native.ps),
            ("POST", "/api/show", native.show),
            ("POST", "/api/generate", native.generate),
            ("POST", "/api/chat", native.chat),
            ("POST", "/api/embed", native.embed),
            ("POST", "/api/embeddings", native.embeddings),
            ("POST", "/api/pull", manage.pull),
            ("DELETE", "/api/delete", manage.delete),
            ("POST", "/api/copy", manage.copy),
            ("POST", "/api/create", manage.create),
            ("HEAD", "/api/blobs/{digest}", manage.head_blob),
            ("POST", "/api/blobs/{digest}", manage.create_blob),
            ("POST", "/v1/chat/completions", compatible.chat_completions),
            ("POST", "/v1/completions", compatible.completions),
            ("POST", "/v1/embeddings", compatible.embeddings),
            ("GET", "/v1/models", compatible.list_models),
            ("GET", "/v1/models/{model:.+}", compatible.retrieve_model),
            ("GET", STATE_PATH, self.state),
            *self._occupancy_route(),
            *self._routes_since({anthropic.MESSAGES: agents.messages, RESPONSES: agents.responses}),
            *(
                [("POST", anthropic.COUNT_TOKENS, agents.count_tokens)]
                if self.config.count_tokens
                else []
            ),
        ):
            if method == "GET":
                app.router.add_get(path, handler)
            else:
                app.router.add_route(method, path, handler)
        return app

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.emulator.start()
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        protocol_factory = self._runner.server
        assert protocol_factory is not None

        def counting_factory() -> asyncio.Protocol:
            self.connections_accepted += 1
            return protocol_factory()

        self._server = await loop.create_server(
            counting_factory,
            self.config.host,
            self.requested_port,
            reuse_address=True,
            backlog=system_backlog(),
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.emulator.stop()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse foreign Host headers; render errors as Ollama does (JSON in the route's
        dialect, Go's plain texts for 404/405)."""
        if not host_allowed(self.config.host, request.headers.get("Host", "")):
            return web.Response(status=403)
        if request.method == "POST":
            self.requests_by_route[request.path] += 1
        outcomes = self.emulator.outcomes
        try:
            return await handler(request)
        except ApiError as exc:
            return self._error(request, exc)
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, ApiError(413, "request body too large"))
        except web.HTTPNotFound:
            return web.Response(text=ollama.NOT_FOUND_TEXT, status=404)
        except web.HTTPMethodNotAllowed:
            return web.Response(text=ollama.METHOD_NOT_ALLOWED_TEXT, status=405)
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            raise

    def _error(self, request: web.Request, exc: ApiError) -> web.Response:
        self.emulator.outcomes["rejected_busy" if exc.status == 503 else "error"] += 1
        body = error_body(dialect_of(request.path), exc.status, exc.message)
        return web.Response(body=body, status=exc.status, content_type="application/json")

    # -- emulator-only --------------------------------------------------------------------------

    def _routes_since(self, handlers: dict[str, Handler]) -> list[tuple[str, str, Handler]]:
        """The routes the emulated release has (`ollama.ROUTE_SINCE`): an older one answers
        them 404, as that Ollama would."""
        version = ollama.parse_version(self.config.version) or (0, 0, 0)
        served = ollama.routes_since(version)
        return [("POST", path, handler) for path, handler in handlers.items() if path in served]

    def _occupancy_route(self) -> list[tuple[str, str, Handler]]:
        if self.config.occupancy == "slots":
            return [("GET", "/slots", self.slots), ("GET", "/props", self.props)]
        if self.config.occupancy == "vllm":
            return [("GET", "/metrics", self.vllm_metrics)]
        return []

    async def slots(self, request: web.Request) -> web.Response:
        """llama.cpp server's `/slots`: one object per slot of the loaded models."""
        rows: list[dict[str, object]] = []
        for runner in self.emulator.engine.scheduler.loaded():
            for i in range(runner.slots):
                busy = i < runner.busy_slots
                rows.append(
                    {
                        "id": len(rows),
                        "n_ctx": runner.num_ctx,
                        "speculative": False,
                        "is_processing": busy,
                    }
                )
        return json_response(rows)

    async def props(self, request: web.Request) -> web.Response:
        """llama.cpp server's `/props`, what of it clients read: a slot's context, the slots,
        the chat template (one that takes tools, as llama-server's `--jinja` templates do),
        and no vision."""
        settings = self.config.scheduler
        first = self.config.models[0].name if self.config.models else ""
        return json_response(
            {
                "default_generation_settings": {"n_ctx": settings.default_num_ctx},
                "total_slots": settings.num_parallel,
                "model_path": f"/models/{first}.gguf",
                "chat_template": _TOOL_TEMPLATE,
                "modalities": {"vision": False, "audio": False},
            }
        )

    async def vllm_metrics(self, request: web.Request) -> web.Response:
        """vLLM's gauges of requests running and waiting, per model (installed: vLLM has its
        model loaded from the start)."""
        scheduler = self.emulator.engine.scheduler
        running = {r.model: r.busy_slots for r in scheduler.loaded()}
        waiting = Counter(ticket.model for ticket in scheduler.pending)
        for runner in scheduler.loaded():
            waiting[runner.model] += len(runner.waiting)
        lines = []
        for gauge, counts in (("running", running), ("waiting", waiting)):
            lines += [f"# TYPE vllm:num_requests_{gauge} gauge"]
            for spec in self.config.models:
                labels = f'engine="0",model_name="{spec.name}"'
                lines.append(
                    f"vllm:num_requests_{gauge}{{{labels}}} {float(counts.get(spec.name, 0))}"
                )
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def state(self, request: web.Request) -> web.Response:
        """Not part of Ollama: what tests and capacity planners want to see inside."""
        scheduler = self.emulator.engine.scheduler
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
                "loads": dict(scheduler.loads),
                "prompt_tokens": dict(self.emulator.engine.prompt_tokens),
                "cached_tokens": dict(self.emulator.engine.cached_tokens),
                "connections_accepted": self.connections_accepted,
                "requests_by_route": dict(self.requests_by_route),
                "outcomes": dict(self.emulator.outcomes),
            }
        )
