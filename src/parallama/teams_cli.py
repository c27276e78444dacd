"""`parallama keys` and `parallama usage`: keys made, changed, revoked and listed, and the
ledger summed, straight in the database that `parallama serve` reads (found the same way:
`--config`, `PARALLAMA_DATABASE`, `--database`). A running gateway sees a change within a
second."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from parallama import config
from parallama.bench.trace import MAX_REQUESTS, TraceError, from_ledger, trace_lines
from parallama.errors import ConfigError
from parallama.teams.access import describe
from parallama.teams.keys import LIMITS, ApiKey, key_fields, make_key, parse_age
from parallama.teams.options import add_database_arguments
from parallama.teams.store import GROUPS, Store, open_store


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key; it is printed once")
    create.add_argument("name", help="a name for the key: a person, a team, a service")
    _limit_arguments(create)
    update = actions.add_parser("update", help="change a key's models or limits")
    update.add_argument("name")
    _limit_arguments(update, lifting=True)
    for name, text in (("list", "every key"), ("show", "one key"), ("revoke", "revoke a key")):
        action = actions.add_parser(name, help=text)
        if name != "list":
            action.add_argument("name")
    for action in actions.choices.values():
        add_database_arguments(action)
        action.add_argument("--json", action="store_true", help="print JSON")


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", default="7d", help="how far back: 30m, 12h, 7d, 4w (default: %(default)s)"
    )
    parser.add_argument(
        "--by",
        default="key,model",
        help=f"group by some of {','.join(GROUPS)} (default: %(default)s)",
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print JSON")
    shape.add_argument("--csv", action="store_true", help="print CSV")
    shape.add_argument(
        "--trace",
        metavar="FILE",
        help="write the answered requests as a trace (JSON Lines: time, model, token counts, "
        "key; no prompt or answer) for parallama plan --replay and bench --replay (- for "
        "standard output)",
    )
    add_database_arguments(parser)


def _limit_arguments(parser: argparse.ArgumentParser, *, lifting: bool = False) -> None:
    lift = " ('none' lifts it)" if lifting else ""
    parser.add_argument("--models", help="model patterns it may use, comma-separated (llama3*)")
    parser.add_argument("--rpm", help=f"requests per minute{lift}")
    parser.add_argument("--tpm", help=f"tokens per minute, prompt + generated{lift}")
    parser.add_argument("--max-concurrent", help=f"requests at once{lift}")
    parser.add_argument("--budget", help=f"tokens per period: 1000000/day, /week, /month{lift}")
    parser.add_argument("--priority", help="its weight in fair shares, 1-100 (default: 1)")
    parser.add_argument("--expires", help=f"a date (2027-01-31: through that day, UTC){lift}")
    parser.add_argument(
        "--manage", help="yes: it may pull, push, create, copy and delete models (default: no)"
    )


def run_keys(args: argparse.Namespace) -> int:
    store = open_store(config.database_of(args.config, flag=args.database))
    try:
        return _KEY_ACTIONS[args.action](store, args)
    finally:
        store.close()


def run_usage(args: argparse.Namespace) -> int:
    by = [g.strip() for g in args.by.split(",") if g.strip()]
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise ConfigError(f"--by {','.join(unknown)}: choose from {','.join(GROUPS)}")
    since = time.time() - parse_age(args.since)
    store = open_store(config.database_of(args.config, flag=args.database))
    try:
        if args.trace:
            return _write_trace(store.answered(since, MAX_REQUESTS + 1), args.trace, args.since)
        rows = store.usage(since, by)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        columns = [*by, "requests", "errors", "prompt_tokens", "generated_tokens"]
        columns += ["queue_seconds", "seconds"]
        writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _usage_table(rows, by, args.since)
    return 0


def _write_trace(rows: list[dict[str, Any]], path: str, since: str) -> int:
    try:
        requests = from_ledger(rows)
    except TraceError as exc:
        raise ConfigError(f"the ledger since {since}: {exc}") from None
    if not requests:
        raise ConfigError(f"no answered request in the ledger in the last {since}")
    if path == "-":
        sys.stdout.buffer.writelines(trace_lines(requests))
    else:
        with open(path, "wb") as out:
            out.writelines(trace_lines(requests))
        span = requests[-1].time
        print(f"{len(requests)} requests over {span:.0f} s written to {path}", file=sys.stderr)
    return 0


# -- the actions -------------------------------------------------------------------------------


def _create(store: Store, args: argparse.Namespace) -> int:
    key, record = make_key(args.name, _given(args), time.time())
    store.add_key(record)
    if args.json:
        print(json.dumps({"key": key, **describe(record)}, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(f"Key [bold]{record.name}[/] created. It is shown this once; keep it now:")
    print(key)  # plain, whole, on a line of its own: for copying and for scripts
    return 0


def _update(store: Store, args: argparse.Namespace) -> int:
    changes = key_fields(_given(args))
    if not changes:
        raise ConfigError("nothing to change: give --rpm, --tpm, --models, ...")
    _show_one(store.update_key(args.name, **changes), args.json)
    return 0


def _revoke(store: Store, args: argparse.Namespace) -> int:
    record = store.update_key(args.name, revoked_at=time.time())
    if args.json:
        print(json.dumps(describe(record), indent=2))
    else:
        print(f"key {record.name} revoked: gateways refuse it within a second")
    return 0


def _show(store: Store, args: argparse.Namespace) -> int:
    record = store.key(args.name)
    if record is None:
        raise ConfigError(f"no key named {args.name!r}")
    _show_one(record, args.json)
    return 0


def _list(store: Store, args: argparse.Namespace) -> int:
    keys = store.keys()
    if args.json:
        print(json.dumps([describe(k) for k in keys], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "models", "rpm", "tpm", "at once", "budget", "priority", "state")
    for k in keys:
        table.add_row(
            k.name,
            ",".join(k.models) or "all",
            *(_or_dash(v) for v in (k.rpm, k.tpm, k.max_concurrent, k.budget)),
            str(k.priority),
            _state(k),
        )
    Console().print(table)
    return 0


_KEY_ACTIONS: dict[str, Callable[[Store, argparse.Namespace], int]] = {
    "create": _create,
    "update": _update,
    "revoke": _revoke,
    "show": _show,
    "list": _list,
}


def _show_one(record: ApiKey, as_json: bool) -> None:
    shown = describe(record)
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    shown["models"] = ",".join(record.models) or "all"
    shown["state"] = _state(record)
    for name in ("created_at", "expires_at", "revoked_at"):
        shown[name] = _when(shown[name])
    width = max(len(name) for name in shown)
    for name, value in shown.items():
        print(f"{name:<{width}}  {_or_dash(value)}")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in LIMITS}


def _usage_table(rows: Sequence[dict[str, Any]], by: Sequence[str], since: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"usage, last {since}")
    for name in by:
        table.add_column(name)
    for name in ("requests", "errors", "prompt tokens", "generated", "queue", "time"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            *(str(row[name] if row[name] is not None else "-") for name in by),
            f"{row['requests']:,}",
            f"{row['errors']:,}",
            f"{row['prompt_tokens']:,}",
            f"{row['generated_tokens']:,}",
            _seconds_text(row["queue_seconds"]),
            _seconds_text(row["seconds"]),
        )
    Console().print(table)


def _state(key: ApiKey) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.usable(time.time()) else "expired"


def _when(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _or_dash(value: object) -> str:
    return "-" if value is None or value == [] else str(value)


def _seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
