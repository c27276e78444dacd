"""API keys (sans-I/O): how one is made, recognised, checked and described.

A key reads `pk-<id>-<secret>`: `pk-` says what it is (as `sk-` does for OpenAI's), `<id>` (8
characters) names its row without revealing anything, `<secret>` carries 192 random bits. Only a
SHA-256 hash of the whole key is stored: the key has enough entropy that a slow hash would add
nothing but cost on every request, and the hash is compared in constant time.
"""

from __future__ import annotations

import calendar
import datetime
import fnmatch
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from parallama.errors import ConfigError
from parallama.redaction import KEY_SHAPE

PREFIX = "pk-"
_ID_LENGTH = 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_AGE = re.compile(r"(\d+)([mhdw])")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")


@dataclass(frozen=True, slots=True)
class Budget:
    tokens: int
    period: Period

    def __str__(self) -> str:
        return f"{self.tokens}/{self.period}"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as stored: its limits and state, never the key itself."""

    name: str
    key_id: str
    key_hash: str
    created_at: float
    models: tuple[str, ...] = ()  # patterns (`llama3*`); none: every model
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + generated) per minute
    max_concurrent: int | None = None
    budget: Budget | None = None
    priority: int = 1  # its weight in fair shares
    expires_at: float | None = None
    revoked_at: float | None = None
    manage: bool = False  # may pull, push, create, copy and delete models, and upload blobs

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def may_use(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


def new_key() -> tuple[str, str, str]:
    """A fresh key: the key (shown once), its id and its hash."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(_ID_LENGTH))
    key = f"{PREFIX}{key_id}-{secrets.token_urlsafe(24)}"  # 24 bytes: 192 bits, 32 characters
    return key, key_id, hash_key(key)


def make_key(name: str, limits: Mapping[str, Any], now: float) -> tuple[str, ApiKey]:
    """A new key named `name` with `limits` (see `key_fields`): the key, shown once, and
    what is stored of it."""
    key, key_id, key_hash = new_key()
    return key, ApiKey(check_name(name), key_id, key_hash, now, **key_fields(limits))


def parse_age(text: str) -> float:
    """`30m`, `12h`, `7d`, `4w`: seconds."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text[:32]!r}: a number and m, h, d or w (7d)")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id inside a key of the right shape, else None (then it is no key of ours)."""
    match = KEY_SHAPE.fullmatch(key)
    return None if match is None else match[1]


def matches(key: str, stored: ApiKey) -> bool:
    return hmac.compare_digest(hash_key(key), stored.key_hash)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"key name {name[:70]!r}: 1-64 letters, digits and . _ @ -, starting with a letter "
            "or digit"
        )
    return name


def parse_budget(text: str) -> Budget:
    """`100000/day`, `/week` or `/month` (calendar periods, UTC)."""
    tokens, _, period = text.partition("/")
    if not tokens.strip().isdigit() or period.strip() not in PERIODS:
        raise ConfigError(f"budget {text!r}: write TOKENS/day, TOKENS/week or TOKENS/month")
    return Budget(int(tokens), period.strip())  # type: ignore[arg-type]


def parse_expiry(text: str) -> float:
    """`2027-01-31` (the end of that day, UTC) or an ISO 8601 time; unix seconds."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"expiry {text!r}: write a date (2027-01-31) or an ISO time") from None
    if len(text) == 10:  # a date: valid through that day
        when += datetime.timedelta(days=1)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def period_start(period: Period, now: float) -> float:
    """When the budget period containing `now` began (UTC calendar: day, Monday, 1st)."""
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    if period == "week":
        day -= datetime.timedelta(days=day.weekday())
    elif period == "month":
        day = day.replace(day=1)
    return calendar.timegm(day.timetuple())


def period_end(period: Period, now: float) -> float:
    start = datetime.datetime.fromtimestamp(period_start(period, now), datetime.UTC)
    if period == "day":
        end = start + datetime.timedelta(days=1)
    elif period == "week":
        end = start + datetime.timedelta(days=7)
    else:
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    return end.timestamp()


LIMITS = ("models", "rpm", "tpm", "max_concurrent", "budget", "priority", "expires", "manage")


def key_fields(given: Mapping[str, Any]) -> dict[str, Any]:
    """The limits given (from flags or an admin request's JSON) as `ApiKey` fields, checked:
    absent ones are left out, `"none"` lifts one. `ConfigError` names what is wrong."""
    found: dict[str, Any] = {}
    for name in LIMITS:
        value = given.get(name)
        if value is None:
            continue
        if name == "manage":
            found["manage"] = _yes_or_no(name, value)
        elif value == "none" and name != "priority":
            lifted = {"expires": ("expires_at", None), "models": ("models", ())}
            field_name, nothing = lifted.get(name, (name, None))
            found[field_name] = nothing
        elif name == "models":
            patterns = value.split(",") if isinstance(value, str) else value
            if not isinstance(patterns, list | tuple) or not all(
                isinstance(p, str) for p in patterns
            ):
                raise ConfigError("models: model name patterns, comma-separated or a list")
            found["models"] = tuple(p.strip() for p in patterns if p.strip())
        elif name == "budget":
            found["budget"] = parse_budget(str(value))
        elif name == "expires":
            found["expires_at"] = parse_expiry(str(value))
        else:
            found[name] = _whole(name, value, 100 if name == "priority" else None)
    return found


def _yes_or_no(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("yes", "no", "true", "false"):
        raise ConfigError(f"{name}: yes or no, not {text[:32]!r}")
    return text in ("yes", "true")


def _whole(name: str, value: Any, most: int | None) -> int:
    text = str(value)
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name}: {text[:32]!r} is not a positive whole number")
    if most is not None and int(text) > most:
        raise ConfigError(f"{name}: at most {most}")
    return int(text)
