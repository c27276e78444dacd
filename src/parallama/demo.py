"""`parallama demo`: emulated Ollama servers and the gateway in one process, ready to try.

It needs no GPU and no Ollama: the backends are `parallama sim` servers on free loopback ports,
each with Ollama's default of one slot per model, so a handful of concurrent requests already
shows the gateway queueing and spreading work.
"""

from __future__ import annotations

import shlex

from parallama.config import BackendSettings, GatewaySettings
from parallama.gateway.run import describe as describe_gateway
from parallama.gateway.run import running_gateway
from parallama.runtime import stop_requested
from parallama.sim.config import SimConfig
from parallama.sim.run import running_servers
from parallama.sim.timing import PROFILES

DEMO_MODEL = "qwen2.5:7b"


def examples(url: str, model: str = DEMO_MODEL) -> tuple[str, str]:
    """A curl command and a Python snippet (official `ollama` client) against `url`."""
    body = (
        f'{{"model": "{model}", "stream": false, '
        '"messages": [{"role": "user", "content": "Why is the sky blue?"}]}'
    )
    curl = f"curl -s {url}/api/chat -d {shlex.quote(body)}"
    python = (
        "from ollama import Client\n"
        f'reply = Client(host="{url}").chat(model="{model}", '
        'messages=[{"role": "user", "content": "Why is the sky blue?"}])\n'
        "print(reply.message.content)"
    )
    return curl, python


async def run_demo(port: int, backends: int, profile: str) -> None:
    sim = SimConfig(host="127.0.0.1", ports=(0,) * backends, timing=PROFILES[profile].timing)
    async with running_servers(sim) as servers:
        settings = GatewaySettings(
            backends=tuple(BackendSettings(url=server.url) for server in servers),
            port=port,
            slots=sim.scheduler.num_parallel,
        )
        async with running_gateway(settings) as gateway:
            curl, python = examples(gateway.url)
            models = ", ".join(m.name for m in sim.models)
            print(
                f"{describe_gateway(gateway, 'demo')}\n"
                f"  the backends are emulated Ollama servers (profile {profile}): {models}\n\n"
                f"Try it with curl:\n  {curl}\n\n"
                "or from Python (pip install ollama):\n"
                + "\n".join(f"  {line}" for line in python.splitlines())
                + "\n\nCtrl-C to stop",
                flush=True,
            )
            await stop_requested()
