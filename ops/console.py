"""What every CLI command shares: one way to fail."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console


def fail(reason: str) -> NoReturn:
    """Print a one-line reason to stderr and exit with status 1."""
    Console(stderr=True).print(f"[red]error:[/red] {reason}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
