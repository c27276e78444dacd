"""`parallama.client`: sync and async clients for the Ollama API with a keep-alive connection
pool, retries with backoff that honour `Retry-After`, failover over several endpoints with
circuit breakers, and (async) bounded concurrency for many requests at once.

    from parallama.client import Client
    client = Client(["http://10.0.0.5:11500", "http://10.0.0.6:11500"])
    reply = client.chat("qwen2.5:7b", [{"role": "user", "content": "hi"}])
    print(reply.message.content)

Every error it raises is a `ClientError`: `ResponseError` (the server answered with an error),
`UnreachableError` (no endpoint answered), `TransportError` (the answer timed out or broke off).

Built on httpx, the ecosystem's client (the official `ollama` package uses it too). Measured
(`benchmarks/client_overhead.py`, sequential keep-alive GETs to the emulator on loopback): about
0.8 ms per request with httpx's sync client and 1.0 ms with its async one, against 0.26 ms with
aiohttp, which is nothing beside a model's answer; the gateway, where it does matter, has its own
client.
"""

from parallama.client.aio import AsyncClient
from parallama.client.calls import Answer, ChatFields, EmbedFields, GenerateFields
from parallama.client.errors import ClientError, ResponseError, TransportError, UnreachableError
from parallama.client.options import ClientSettings, Options
from parallama.client.retry import RetryPolicy
from parallama.client.sync import Client

__all__ = [
    "Answer",
    "AsyncClient",
    "ChatFields",
    "Client",
    "ClientError",
    "ClientSettings",
    "EmbedFields",
    "GenerateFields",
    "Options",
    "ResponseError",
    "RetryPolicy",
    "TransportError",
    "UnreachableError",
]
