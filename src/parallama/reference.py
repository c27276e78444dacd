"""The docs' reference pages, made from the code, so that they cannot drift from it: every
setting of `parallama serve` from the config models (its type, default, flag, environment
variable and TOML key, one source), and every command's options from its argparse parser.

    python -m parallama.reference docs/reference    # writes settings.md and commands.md

A test compares the pages in `docs/reference` with what this makes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

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


PAGES = {"settings.md": settings_page, "commands.md": commands_page}


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reference")
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in PAGES.items():
        (folder / name).write_text(make())


if __name__ == "__main__":
    main()
