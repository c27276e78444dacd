"""API keys kept out of what is written down: a key-shaped string in a request's path (a client
that put its key in the query) never reaches a log line. The shape is the teams' keys'
(`teams.keys`: pk-<id>-<secret>); it lives here, below both, so that the request's record
(`core.exchange`) can redact without importing the teams."""

from __future__ import annotations

import re

KEY_SHAPE = re.compile(r"pk-([A-Za-z0-9]{8})-[A-Za-z0-9_-]{32}")


def redact_keys(text: str) -> str:
    """`text` with anything shaped like a key replaced: for what reaches a log line."""
    return KEY_SHAPE.sub("pk-<redacted>", text) if "pk-" in text else text
