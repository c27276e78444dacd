"""A request's body as the JSON object every API here takes (sans-I/O)."""

from __future__ import annotations

from typing import Any

import orjson

from parallama.errors import ApiError


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 `ApiError` saying what is wrong with it."""
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value
