"""The flags that say where the keys' database is, for every command that reads it (`keys`,
`usage`, `plan --replay ledger`): the gateway's TOML file, or the database itself."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="the gateway's TOML file, for its database"
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="a SQLite file or postgresql://... (default: the gateway's setting)",
    )
