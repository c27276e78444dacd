"""Ollama's API in front of an OpenAI-dialect engine (llama.cpp's server, vLLM, LM Studio,
SGLang): requests one way, answers the other, streams included (sans-I/O).

`ollama_request` turns an Ollama request into the OpenAI request that does the same work; the
`AnswerTranslator` it comes with turns the engine's answer back into what Ollama would have
sent, whole or as NDJSON chunks fed in as the bytes arrive. The clock is passed in, so the
timing fields of the final chunk (Ollama's `total_duration`, `load_duration`, ...) are computed
from timestamps the caller supplies: the engine's own `timings` when it reports them (llama.cpp
does), else the moments the bytes came.

Ollama's `/api/generate` applies the model's chat template unless `raw` is set, so it becomes a
chat completion; only a raw prompt goes to `/v1/completions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from parallama.errors import ApiError
from parallama.protocol.bodies import parse_json_object
from parallama.protocol.ollama import final_statistics, rfc3339

Kind = Literal["chat", "generate", "embed", "embeddings"]
CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
EMBEDDINGS = b"/v1/embeddings"

# Ollama options with the same meaning in OpenAI's request (or llama.cpp's and vLLM's extensions
# of it). Runner options such as num_ctx or num_gpu belong to the engine's own start-up settings.
_SAME_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "repeat_penalty",
)
_IMAGE_TYPES = {"iVBOR": "image/png", "R0lGOD": "image/gif", "UklGR": "image/webp"}


class BadAnswer(ValueError):
    """The engine's answer is not what its dialect promises; the message completes
    "backend <url> ..."."""


@dataclass(frozen=True)
class Translated:
    """What to send instead: `target` and `body` for the engine, or `local`, the whole answer
    when there is nothing to compute (Ollama's load request: an empty prompt)."""

    kind: Kind
    model: str
    stream: bool
    target: bytes = b""
    body: bytes = b""
    local: bytes | None = None


def ollama_request(path: str, raw: bytes, now: float) -> Translated:
    """The OpenAI request for an Ollama one; `ApiError` (400) for what cannot be expressed."""
    data = parse_json_object(raw)
    model = str(data.get("model", ""))
    if path == "/api/chat":
        return _chat(data, model, now)
    if path == "/api/generate":
        return _generate(data, model, now)
    if path in ("/api/embed", "/api/embeddings"):
        return _embed(data, model, legacy=path == "/api/embeddings")
    raise ApiError(501, f"{path} is not available on an OpenAI-dialect backend")


def _chat(data: dict[str, Any], model: str, now: float) -> Translated:
    stream = _stream_flag(data)
    messages = data.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a list of objects")
    if not messages:
        return _loaded(model, "chat", stream, data, now)
    request = {"model": model, "messages": [_message(m) for m in messages]}
    if data.get("tools"):
        request["tools"] = data["tools"]
    return _completion(CHAT, request, data, "chat", model)


def _generate(data: dict[str, Any], model: str, now: float) -> Translated:
    stream = _stream_flag(data)
    prompt = data.get("prompt") or ""
    images = data.get("images") or []
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string")
    if not prompt and not images:
        return _loaded(model, "generate", stream, data, now)
    if data.get("raw"):
        request: dict[str, Any] = {"model": model, "prompt": prompt}
        if isinstance(data.get("suffix"), str):
            request["suffix"] = data["suffix"]
        return _completion(COMPLETIONS, request, data, "generate", model)
    messages = []
    if isinstance(data.get("system"), str) and data["system"]:
        messages.append({"role": "system", "content": data["system"]})
    messages.append(_message({"role": "user", "content": prompt, "images": images}))
    return _completion(CHAT, {"model": model, "messages": messages}, data, "generate", model)


def _embed(data: dict[str, Any], model: str, *, legacy: bool) -> Translated:
    given = data.get("prompt" if legacy else "input")
    if given is None and not legacy:
        given = []
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        field_name = "prompt" if legacy else "input"
        raise ApiError(400, f"{field_name} must be a string or a list of strings")
    request: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
    if isinstance(data.get("dimensions"), int) and data["dimensions"] > 0:
        request["dimensions"] = data["dimensions"]
    kind: Kind = "embeddings" if legacy else "embed"
    return Translated(kind, model, False, EMBEDDINGS, orjson.dumps(request))


def _stream_flag(data: dict[str, Any]) -> bool:
    stream = data.get("stream")
    return True if stream is None else bool(stream)


def _loaded(model: str, kind: Kind, stream: bool, data: dict[str, Any], now: float) -> Translated:
    """Ollama's answer to an empty prompt, given here: an OpenAI engine keeps its model loaded
    anyway, and cannot unload it: `keep_alive: 0` gets Ollama's "unload" answer, to no effect."""
    answer: dict[str, Any] = {"model": model, "created_at": rfc3339(now)}
    if kind == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    answer |= {"done": True, "done_reason": "unload" if data.get("keep_alive") == 0 else "load"}
    return Translated(kind, model, stream, local=orjson.dumps(answer) + (b"\n" if stream else b""))


def _completion(
    target: bytes, request: dict[str, Any], data: dict[str, Any], kind: Kind, model: str
) -> Translated:
    stream = _stream_flag(data)
    options = data.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object")
    request |= {k: options[k] for k in _SAME_OPTIONS if options.get(k) is not None}
    predict = options.get("num_predict")
    if isinstance(predict, int) and predict >= 0:  # -1: no limit, -2: fill the context
        request["max_tokens"] = predict
    response_format = _response_format(data.get("format"))
    if response_format is not None:
        request["response_format"] = response_format
    if target == CHAT:
        request |= _thinking(data.get("think"))
    request["stream"] = stream
    if stream:
        request["stream_options"] = {"include_usage": True}
    return Translated(kind, model, stream, target, orjson.dumps(request))


_THINK_LEVELS = ("high", "medium", "low")


def _thinking(think: Any) -> dict[str, Any]:
    """Ollama's `think` as the engines take it: `enable_thinking` for the chat template (Qwen3,
    DeepSeek and the like, on llama-server and vLLM alike), and a level (gpt-oss) also as
    OpenAI's `reasoning_effort`. Unsaid: the engine's default, as at Ollama."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if think in _THINK_LEVELS:
        kwargs = {"enable_thinking": True, "reasoning_effort": think}
        return {"reasoning_effort": think, "chat_template_kwargs": kwargs}
    raise ApiError(400, 'think must be true, false, "high", "medium" or "low"')


def _response_format(given: Any) -> dict[str, Any] | None:
    if given in (None, ""):
        return None
    if given == "json":
        return {"type": "json_object"}
    if isinstance(given, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": given}}
    raise ApiError(400, 'format must be "json" or a JSON schema object')


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """One Ollama message as OpenAI's: images become data-URL parts, tool-call arguments a JSON
    string, `thinking` the `reasoning_content` llama-server's and vLLM's templates read."""
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ApiError(400, "each message needs a role")
    content = message.get("content") or ""
    images = message.get("images") or []
    converted: dict[str, Any] = {"role": role, "content": content}
    if images:
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ApiError(400, "images must be a list of base64 strings")
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        parts += [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
        converted["content"] = parts
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        converted["tool_calls"] = [_openai_tool_call(i, call) for i, call in enumerate(calls)]
    if role == "tool" and isinstance(message.get("tool_name"), str):
        converted["name"] = message["tool_name"]
    if isinstance(message.get("tool_call_id"), str):
        converted["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("thinking"), str) and message["thinking"]:
        converted["reasoning_content"] = message["thinking"]
    return converted


def _data_url(image: str) -> str:
    if image.startswith("data:"):
        return image
    kind = next((t for prefix, t in _IMAGE_TYPES.items() if image.startswith(prefix)), "image/jpeg")
    return f"data:{kind};base64,{image}"


def _openai_tool_call(index: int, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise ApiError(400, 'each tool call needs "function": {"name": ..., "arguments": ...}')
    arguments = function.get("arguments", {})
    return {
        "id": call.get("id") or f"call_{index}",
        "type": "function",
        "function": {
            "name": function.get("name", ""),
            "arguments": arguments
            if isinstance(arguments, str)
            else orjson.dumps(arguments).decode(),
        },
    }


def _ollama_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = _object(call.get("function"))
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        parsed = {}  # a model that wrote broken JSON: Ollama would not have parsed it either
    return {"function": {"name": function.get("name", ""), "arguments": parsed}}


# -- answers -----------------------------------------------------------------------------------


def error_message(body: bytes) -> str:
    """The message in an engine's error answer: OpenAI's error object, llama.cpp's, FastAPI's
    `detail`, or the text itself."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500] or "no message"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):  # FastAPI's validation errors
            return "; ".join(
                str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail
            )
    return body.decode("utf-8", "replace")[:500]


def ollama_status(status: int) -> int:
    """FastAPI engines answer 422 to a request they cannot use; Ollama says 400."""
    return 400 if status == 422 else status


@dataclass
class AnswerTranslator:
    """The engine's answer to one translated request, turned back into Ollama's.

    `sent` is when the request left for the engine, `arrived` when the client's request reached
    the gateway: Ollama counts the wait for a slot into `load_duration` and `total_duration`.
    """

    request: Translated
    arrived: float
    sent: float
    _pending: bytes = b""
    _data: list[bytes] = field(default_factory=list)
    _first_token: float | None = None
    _generated: int = 0
    _tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    _finish: str | None = None
    _usage: dict[str, Any] = field(default_factory=dict)
    _timings: dict[str, Any] = field(default_factory=dict)
    done: bool = False

    # -- a whole answer -------------------------------------------------------------------------

    def whole(self, body: bytes, now: float) -> bytes:
        """A complete OpenAI answer as Ollama's JSON object (or its one NDJSON line, when the
        client asked for a stream but it came whole)."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadAnswer("sent an answer that is not JSON") from None
        if not isinstance(data, dict):
            raise BadAnswer("sent an answer that is not a JSON object")
        kind = self.request.kind
        if kind in ("embed", "embeddings"):
            return orjson.dumps(self._embeddings(data, now))
        choice = _first_choice(data)
        self._usage = _object(data.get("usage"))
        self._timings = _object(data.get("timings"))
        self._finish = choice.get("finish_reason")
        message = _object(choice.get("message"))
        text = choice.get("text") if "text" in choice else message.get("content")
        calls = _list(message.get("tool_calls"))
        answer = self._chunk(
            str(text or ""),
            now,
            thinking=message.get("reasoning_content"),
            tool_calls=[_ollama_tool_call(c) for c in calls if isinstance(c, dict)],
        )
        answer |= self._final(now)
        self.done = True
        return orjson.dumps(answer) + (b"\n" if self.request.stream else b"")

    def _embeddings(self, data: dict[str, Any], now: float) -> dict[str, Any]:
        rows = data.get("data")
        if not isinstance(rows, list):
            raise BadAnswer("sent an embeddings answer without a data list")
        rows = sorted((r for r in rows if isinstance(r, dict)), key=lambda r: r.get("index", 0))
        vectors = [r.get("embedding") for r in rows]
        if not all(isinstance(v, list) and all(_is_number(x) for x in v) for v in vectors):
            raise BadAnswer("sent embeddings that are not lists of numbers")
        if self.request.kind == "embeddings":
            return {"embedding": vectors[0] if vectors else []}
        usage = _object(data.get("usage"))
        answer: dict[str, Any] = {
            "model": self.request.model,
            "embeddings": [_unit(v) for v in vectors],  # Ollama's /api/embed normalises them
        }
        stats = final_statistics(
            total=now - self.arrived,
            load=self.sent - self.arrived,
            prompt_eval_count=_int(usage.get("prompt_tokens")),
            prompt_eval=0,
            eval_count=0,
            eval_=0,
        )
        answer |= {k: v for k, v in stats.items() if k != "prompt_eval_duration"}
        return answer

    # -- a stream -------------------------------------------------------------------------------

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Server-sent events in, as many NDJSON lines out as they complete (maybe none)."""
        self._pending += chunk
        out = []
        while not self.done and b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                self._data.append(line[5:].removeprefix(b" "))
            elif not line and self._data:  # a blank line ends an event
                payload, self._data = b"\n".join(self._data), []
                out.append(self._event(payload, now))
        return b"".join(out)

    def end(self, now: float) -> bytes:
        """The stream closed: the final chunk, if the engine's `[DONE]` did not already bring it."""
        if self.done:
            return b""
        return self._finish_stream(now)

    def _event(self, payload: bytes, now: float) -> bytes:
        if payload.strip() == b"[DONE]":
            return self._finish_stream(now)
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return b""  # not an event of OpenAI's: a keep-alive or an engine's own note
        if not isinstance(data, dict):
            return b""
        if "error" in data:
            self.done = True
            return orjson.dumps({"error": error_message(payload)}) + b"\n"
        self._usage = _object(data.get("usage")) or self._usage
        self._timings = _object(data.get("timings")) or self._timings
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return b""  # the usage chunk
        choice = choices[0]
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        delta = _object(choice.get("delta"))
        text = choice.get("text") if "text" in choice else delta.get("content")
        thinking = delta.get("reasoning_content")
        for call in _list(delta.get("tool_calls")):
            if isinstance(call, dict):
                self._gather_tool_call(call)
        if not text and not thinking:
            return b""
        if self._first_token is None:
            self._first_token = now
        self._generated += 1
        return orjson.dumps(self._chunk(str(text or ""), now, thinking=thinking)) + b"\n"

    def _gather_tool_call(self, delta: dict[str, Any]) -> None:
        """OpenAI streams a tool call in pieces (its arguments as string fragments); Ollama sends
        each call whole."""
        index = delta.get("index", len(self._tool_calls))
        call = self._tool_calls.setdefault(index, {"function": {"name": "", "arguments": ""}})
        function = _object(delta.get("function"))
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def _finish_stream(self, now: float) -> bytes:
        self.done = True
        lines = b""
        if self._tool_calls:
            calls = [_ollama_tool_call(c) for _, c in sorted(self._tool_calls.items())]
            lines = orjson.dumps(self._chunk("", now, tool_calls=calls)) + b"\n"
        final = self._chunk("", now) | self._final(now)
        return lines + orjson.dumps(final) + b"\n"

    # -- the pieces -----------------------------------------------------------------------------

    def _chunk(
        self,
        text: str,
        now: float,
        *,
        thinking: Any = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self.request.model, "created_at": rfc3339(now)}
        if self.request.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if isinstance(thinking, str) and thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            chunk["message"] = message
        else:
            chunk["response"] = text
            if isinstance(thinking, str) and thinking:
                chunk["thinking"] = thinking
        chunk["done"] = False
        return chunk

    def _final(self, now: float) -> dict[str, Any]:
        """`done`, `done_reason` and the statistics: token counts from `usage` (else the chunks
        counted), durations from llama.cpp's `timings` (else the moments the bytes came)."""
        usage, timings = self._usage, self._timings
        # A whole answer without timings shows no first token: all its time counts as decoding.
        first = self._first_token if self._first_token is not None else self.sent
        prompt_seconds = _seconds(timings.get("prompt_ms"), first - self.sent)
        eval_seconds = _seconds(timings.get("predicted_ms"), now - first)
        reason = "length" if self._finish == "length" else "stop"
        return {
            "done": True,
            "done_reason": reason,
            **final_statistics(
                total=now - self.arrived,
                load=self.sent - self.arrived,
                prompt_eval_count=_int(usage.get("prompt_tokens", timings.get("prompt_n"))),
                prompt_eval=prompt_seconds,
                eval_count=_int(usage.get("completion_tokens", self._generated)),
                eval_=eval_seconds,
            ),
        }


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadAnswer("sent an answer without choices")
    return choices[0]


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return vector if norm == 0 else [x / norm for x in vector]


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(milliseconds: Any, otherwise: float) -> float:
    return float(milliseconds) / 1000 if _is_number(milliseconds) else otherwise


def _int(value: Any) -> int:
    return int(value) if _is_number(value) else 0
