"""Running the gateway until Ctrl-C or SIGTERM (its settings are in `parallama.config`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from parallama.config import GatewaySettings
from parallama.gateway.app import Gateway
from parallama.runtime import stop_requested


def describe(gateway: Gateway, command: str = "serve") -> str:
    """What runs where: the gateway's address first, then each backend."""
    lines = [f"parallama {command}: gateway on {gateway.url}"]
    for backend in gateway.settings.backends:
        models = ", ".join(sorted(backend.models)) if backend.models is not None else "any model"
        slots = gateway.settings.slots_of(backend)
        lines.append(f"  backend {backend.url}  slots={slots} weight={backend.weight:g}  {models}")
    lines.append(f"  status {gateway.url}/parallama/status   metrics {gateway.url}/metrics")
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def serve(settings: GatewaySettings) -> None:
    async with running_gateway(settings) as gateway:
        print(f"{describe(gateway)}\nCtrl-C to stop", flush=True)
        await stop_requested()
