"""What every CLI command shares: one way to fail, one way to read a time option."""

from __future__ import annotations

from datetime import datetime
from typing import NoReturn

import typer
from rich.console import Console


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
