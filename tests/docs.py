"""The project's documentation as the tests read it: the README and every page of `docs/`."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]


def documentation() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return "\n".join(page.read_text() for page in pages)
