"""Typed access to request fields, with Ollama's status codes and error texts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from parallama.errors import ApiError, excerpt
from parallama.protocol.durations import DurationError, keep_alive_seconds
from parallama.protocol.ollama import name_too_long

T = TypeVar("T")

_JSON_TYPES: dict[type, str] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "bool",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True)
class Body:
    """Typed access to a request object; a wrong type is a 400 naming the field."""

    data: dict[str, Any]
    struct: str  # Go struct name, for messages that read like Ollama's

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        value = self.data.get(name)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
        if not ok:
            got = _JSON_TYPES.get(type(value), "value")
            want = _JSON_TYPES.get(kinds[0], "value")
            field_name = f"{self.struct}.{name}"
            message = (
                f"json: cannot unmarshal {got} into Go struct field {field_name} of type {want}"
            )
            raise ApiError(400, message)
        return value  # type: ignore[return-value]

    def model(self, old_field: str = "") -> str:
        """The model name; `old_field` names the field a route accepted before `model`."""
        name = self.get("model", str, "") or (self.get(old_field, str, "") if old_field else "")
        if not name:
            raise ApiError(400, "model is required")
        if name_too_long(name.strip()) is not None:
            raise ApiError(400, "invalid model name")  # Ollama says no more
        return name

    def keep_alive(self) -> float | None:
        raw = self.data.get("keep_alive")
        if raw is None:
            return None
        try:
            return keep_alive_seconds(raw)
        except DurationError as exc:
            raise ApiError(400, str(exc)) from None

    def options(self) -> dict[str, Any]:
        return self.get("options", dict, {})


def option_int(options: dict[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"option {excerpt(repr(name))} must be a number")
    return int(value)
