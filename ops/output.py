"""What the commands show the user: a one-line failure, result tables, time options read.

Every command fails the same way (a one-line reason on stderr, exit status 1) and prints
query results as the same table, whether it is `sluice sql` or the demo.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table


def say_error(reason: str) -> None:
    """Print a one-line reason to stderr."""
    Console(stderr=True).print(f"[red]error:[/red] {reason}", highlight=False, soft_wrap=True)


def fail(reason: str) -> NoReturn:
    """Print a one-line reason to stderr and exit with status 1 (inside a command)."""
    say_error(reason)
    raise typer.Exit(1)


def iso_ms(value: str | None, name: str) -> int | None:
    """An ISO-8601 time option as epoch milliseconds (None stays None); fails on junk."""
    if value is None:
        return None
    try:
        return int(datetime.fromisoformat(value).timestamp() * 1000)
    except ValueError:
        fail(f"--{name} is not an ISO-8601 time: {value!r}")


def print_rows(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """Print a result as a table on stdout."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    Console().print(table)
