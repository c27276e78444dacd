"""The docs' reference pages, made from the code, so that they cannot drift from it: every
setting of `parallama serve` from the config models (its type, default, flag, environment
variable and TOML key, one source), every command's options from its argparse parser, every
metric from the collectors that `/metrics` scrapes, and the HTTP routes with the errors the
gateway answers itself.

    python -m parallama.reference docs/reference    # settings, commands, metrics, routes

A test compares the pages in `docs/reference` with what this makes.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from parallama import config

_HELP_COLUMNS = "100"  # argparse wraps its help to the terminal: the same width everywhere


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(field: Any) -> str:
    shown = str(field.annotation).replace("typing.", "").replace("parallama.config.", "")
    return shown.removeprefix("<class '").removesuffix("'>")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "(required)" if field.default_factory is None else "(see below)"
    value = field.default
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value is None or value == ():
        return "(none)"
    return f"`{value}`"


def _table(model: type[BaseModel], *, flags: bool) -> list[str]:
    """A markdown table of the model's fields; with `flags`, each one's flag and environment
    variable too (the top-level settings have them; the tables of the file have not)."""
    columns = ["setting" if flags else "key", "type", "default"]
    columns += ["flag", "environment", "meaning"] if flags else ["meaning"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, field in model.model_fields.items():
        cells = [f"`{name}`", _cell(_type(field)), _default(field)]
        if flags:
            flag = {"backends": "`--backend URL` (repeat)", "models": "(file only)"}.get(
                name, f"`--{name.replace('_', '-')}`"
            )
            cells += [flag, "(file only)" if name == "models" else f"`{config.env_name(name)}`"]
        cells.append(_cell(field.description or ""))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def settings_page() -> str:
    lines = [
        "# Settings",
        "",
        "Generated from `parallama/config.py` (`python -m parallama.reference docs/reference`).",
        "Each setting comes from its flag, else its environment variable, else the TOML file",
        "given by `--config` (or `PARALLAMA_CONFIG`), else its default. The guides explain them",
        "([the gateway](../guides/gateway.md#settings)).",
        "",
        "## `parallama serve`",
        "",
        *_table(config.GatewaySettings, flags=True),
        "",
        "## `[[backends]]`",
        "",
        *_table(config.BackendSettings, flags=False),
        "",
        '## `[models."name"]`',
        "",
        *_table(config.ModelSettings, flags=False),
        "",
    ]
    return "\n".join(lines)


def commands_page() -> str:
    from parallama.cli import build_parser

    os.environ["COLUMNS"] = _HELP_COLUMNS
    parser = build_parser()
    lines = ["# Commands", "", "Generated from the command's own parsers (`--help`).", ""]
    lines += ["```text", parser.format_help().rstrip(), "```", ""]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        lines += [f"## `parallama {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _collectors() -> list[tuple[str, Collector]]:
    """Every collector a gateway's registry may hold, built idle (nothing is connected), with
    when it is there."""
    from parallama.core.scheduler import Scheduler, SchedulerSettings
    from parallama.gateway.http.guard import ConnectionLimits, Connections
    from parallama.gateway.observability.metrics import GatewayMetrics
    from parallama.gateway.shared.slots import SharedSlots
    from parallama.launch.scaling import Scaling
    from parallama.launch.supervisor import InstanceCollector, Supervisor
    from parallama.teams.access import Access
    from parallama.teams.store import Store

    scheduler = Scheduler(SchedulerSettings(), time.monotonic)
    limits = ConnectionLimits(header_timeout=1, send_timeout=1, max_connections=1)
    gateway = GatewayMetrics(scheduler, Connections(limits))
    shared = SharedSlots("redis://127.0.0.1:6379/0", scheduler, lambda: None)
    access = Access(Store(":memory:"), keys_required=True, ledger=True, ledger_capacity=1)
    supervisor = Supervisor([])
    return [
        ("every gateway", gateway.registry),
        ('`state = "redis://..."`', shared.collector()),
        ('`auth = "keys"` or the ledger on', access.collector()),
        ("`parallama up`", InstanceCollector(supervisor)),
        ("`parallama up` with autoscaling", Scaling(supervisor, scheduler).collector()),
    ]


def _series(family: Metric) -> str:
    """The names a family is scraped under."""
    if family.type == "counter":
        return f"`{family.name}_total`"
    if family.type == "histogram":
        return f"`{family.name}_bucket`, `_sum`, `_count`"
    return f"`{family.name}`"


def metrics_page() -> str:
    lines = [
        "# Metrics",
        "",
        "Generated from the collectors `GET /metrics` scrapes (Prometheus text format). How to",
        "read them, and what to alert on: [observability](../guides/observability.md),",
        "[deploying](../guides/deploying.md#what-to-monitor).",
        "",
        "| metric | type | labels | meaning | there with |",
        "|---|---|---|---|---|",
    ]
    for when, collector in _collectors():
        for family in collector.collect():
            # The families declare their label names, also when no series has a value yet.
            labels = ", ".join(f"`{name}`" for name in getattr(family, "_labelnames", ()))
            cells = [_series(family), family.type, labels, _cell(family.documentation), when]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def _summary(handler: Any) -> str:
    """A route handler's docstring, its first paragraph (a method's, or a callable's
    `__call__`)."""
    function = getattr(handler, "__func__", None) or type(handler).__call__
    return " ".join((inspect.getdoc(function) or "").split("\n\n")[0].split())


# What a gateway runs (the emulator, `bench` and the client have errors of their own).
_GATEWAY_CODE = ("gateway", "core", "protocol", "teams")


# The calls that refuse a request with a status and a message.
_REFUSING = frozenset({"ApiError", "_refuse", "_refuse_body", "error_answer", "__init__"})


def _words(node: ast.expr, assigned: dict[str, ast.expr]) -> str:
    """A message as the code writes it: `{...}` where it quotes a value; "" if it is made
    elsewhere."""
    if isinstance(node, ast.Name) and node.id in assigned:
        node = assigned[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = node.values
        return "".join(str(p.value) if isinstance(p, ast.Constant) else "{...}" for p in parts)
    return ""


def _refusals() -> dict[int, list[str]]:
    """Every refusal the gateway's code words itself (`ApiError(status, message)` and the HTTP
    server's), by status."""
    found: dict[int, list[str]] = {}
    package = Path(__file__).parent
    sources = [package / "errors.py"]
    sources += [f for part in _GATEWAY_CODE for f in sorted((package / part).rglob("*.py"))]
    for source in sources:
        tree = ast.parse(source.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assigned = {
                target.id: node.value
                for node in ast.walk(function)
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            for call in ast.walk(function):
                if not isinstance(call, ast.Call) or len(call.args) < 2:
                    continue
                name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
                status = call.args[0]
                if name not in _REFUSING or not isinstance(status, ast.Constant):
                    continue
                if not isinstance(status.value, int) or not 400 <= status.value < 600:
                    continue
                messages = found.setdefault(status.value, [])
                text = _words(call.args[1], assigned)
                if text and text not in messages:
                    messages.append(text)
    return found


def routes_page() -> str:
    from parallama.config import BackendSettings, GatewaySettings
    from parallama.gateway.app import Gateway
    from parallama.protocol.inspect import dialect_of

    backend = BackendSettings(url="http://127.0.0.1:11434")
    gateway = Gateway(GatewaySettings(backends=(backend,)))
    formats = {
        "ollama": '`{"error": ...}`',
        "openai": "OpenAI's error object",
        "anthropic": "Anthropic's error object",
    }
    lines = [
        "# HTTP routes",
        "",
        "Generated from the gateway's route table. *Key*: needs an API key when",
        '`auth = "keys"` (`Authorization: Bearer`, or `x-api-key`). Errors come in the route\'s',
        "own format; a stream that already began ends with one error line or event instead.",
        "Any other path is a 404, any other method a 405, both in the path's format.",
        "",
        "| route | methods | key | errors as | what it does |",
        "|---|---|---|---|---|",
    ]
    for path, by_method in gateway.routes.items():
        handlers = dict.fromkeys(_summary(h) for h in by_method.values())
        cells = [
            f"`{path}`",
            ", ".join(by_method),
            "key" if gateway.needs_key(path) else "",
            formats[dialect_of(path)],
            _cell(" ".join(handlers)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Errors",
        "",
        "Every refusal the gateway makes itself, by status, as the code words it (`{...}`: a",
        "value of the request or the fleet). A backend's own errors are passed on as they",
        "come, put in the route's format where the gateway translated the request.",
        "",
        "| status | messages |",
        "|---|---|",
    ]
    for status, messages in sorted(_refusals().items()):
        worded = "<br>".join(_cell(m) for m in messages) or "(worded where it happens)"
        lines.append(f"| {status} | {worded} |")
    return "\n".join([*lines, ""])


PAGES = {
    "settings.md": settings_page,
    "commands.md": commands_page,
    "metrics.md": metrics_page,
    "routes.md": routes_page,
}


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reference")
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in PAGES.items():
        (folder / name).write_text(make())


if __name__ == "__main__":
    main()
