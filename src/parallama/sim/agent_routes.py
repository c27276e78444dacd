"""The emulator's routes for coding agents: the Anthropic Messages API (`/v1/messages`, Ollama
since v0.14.0) and OpenAI's Responses API (`/v1/responses`, since v0.13.3), each served only by
an emulated release that has it.

Ollama's middleware turns both into its chat requests and their answers back; here they become
the emulator's chat completions (the same scheduler, timing and answers) and their answers are
written back by the same protocol code the gateway translates with.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from parallama.protocol import anthropic, responses
from parallama.protocol.anthropic import MessagesAnswer
from parallama.protocol.responses import ResponsesAnswer
from parallama.sim.answers import chat_prompt
from parallama.sim.emulator import Emulator, json_response
from parallama.sim.openai_routes import OpenAIRoutes
from parallama.sim.requests import Body


class AgentRoutes:
    def __init__(self, emulator: Emulator, chat: OpenAIRoutes) -> None:
        self.emulator = emulator
        self._chat = chat

    async def messages(self, request: web.Request) -> web.StreamResponse:
        data = (await self.emulator.read_body(request, "MessagesRequest")).data
        self.emulator.find_model(Body(data, "MessagesRequest").model())
        body, stream = anthropic.chat_request(data)
        answer = MessagesAnswer(str(data["model"]), stream=stream)
        return await self._chat.chat(request, Body(orjson.loads(body), "MessagesRequest"), answer)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """Not Ollama's (it has no such route): llama.cpp's server counts a Messages request's
        prompt, as `--count-tokens` asks the emulator to."""
        data = (await self.emulator.read_body(request, "MessagesRequest")).data
        self.emulator.find_model(Body(data, "MessagesRequest").model())
        body = Body(orjson.loads(anthropic.chat_request(data)[0]), "MessagesRequest")
        _, tokens = chat_prompt(body.get("messages", list, []), body.get("tools", list, []))
        return json_response({"input_tokens": len(tokens)})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        data = (await self.emulator.read_body(request, "ResponsesRequest")).data
        self.emulator.find_model(Body(data, "ResponsesRequest").model())
        body, stream = responses.chat_request(data)
        answer = ResponsesAnswer(str(data["model"]), data, stream=stream)
        return await self._chat.chat(request, Body(orjson.loads(body), "ResponsesRequest"), answer)
