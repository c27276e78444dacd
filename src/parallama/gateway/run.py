"""Running the gateway until Ctrl-C or SIGTERM, reloading its settings on SIGHUP (the settings
themselves are in `parallama.config`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

from parallama.config import GatewaySettings
from parallama.errors import ConfigError
from parallama.gateway.app import Gateway
from parallama.gateway.workers import worker_index
from parallama.runtime import stop_signals

log = logging.getLogger("parallama.gateway")


def describe(gateway: Gateway, command: str = "serve") -> str:
    """What runs where: the gateway's address first, then each backend."""
    lines = [f"parallama {command}: gateway on {gateway.url}"]
    for backend in gateway.settings.backends:
        models = ", ".join(sorted(backend.models)) if backend.models is not None else "any model"
        slots: int | str = gateway.settings.slots_of(backend)
        if backend.slots == "auto":
            slots = f"auto({backend.min_slots}-{backend.max_slots})"
        lines.append(f"  backend {backend.url}  slots={slots} weight={backend.weight:g}  {models}")
    lines.append(f"  dashboard {gateway.url}/parallama/   status {gateway.url}/parallama/status")
    lines.append(f"  metrics {gateway.url}/metrics")
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: GatewaySettings, reload: Callable[[], GatewaySettings] | None = None
) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings, reload)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def _reload_on_sighup(gateway: Gateway) -> None:
    def reload() -> None:
        try:
            gateway.reload_settings()
        except ConfigError as exc:  # the running settings stay
            log.error("reload refused", extra={"fields": {"error": str(exc)}})

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


async def serve(settings: GatewaySettings, reload: Callable[[], GatewaySettings]) -> None:
    async with running_gateway(settings, reload) as gateway:
        _reload_on_sighup(gateway)
        if (worker_index() or 0) == 0:  # one banner, not one per worker
            print(f"{describe(gateway)}\nCtrl-C to stop, SIGHUP to reload the settings", flush=True)
        with stop_signals() as stop:  # one handler throughout: a second signal is seen too
            await stop.wait()
            stop.clear()
            await _drain(gateway, stop)


async def _drain(gateway: Gateway, stop: asyncio.Event) -> None:
    """Let the requests in flight finish (within `drain_timeout`), unless `stop` is set again
    (a second signal: stop now)."""
    timeout = gateway.settings.drain_timeout
    log.info("stopping: requests in flight finish first", extra={"fields": {"within": timeout}})
    drained = asyncio.ensure_future(gateway.drain(timeout))
    again = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({drained, again}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (drained, again):
            task.cancel()
        await asyncio.gather(drained, again, return_exceptions=True)
