"""`sluice kafka start|stop|status`: the local broker."""

from __future__ import annotations

import typer
from rich.console import Console

from core.settings import BrokerSettings
from ops.errors import BrokerError
from ops.kafka_broker import bootstrap, broker_status, start_broker, stop_broker
from ops.output import fail

kafka_app = typer.Typer(no_args_is_help=True)
console = Console()


@kafka_app.command()
def start() -> None:
    """Start the broker (resolving its jars on first use); a no-op when it runs."""
    try:
        start_broker(BrokerSettings(), console)
    except BrokerError as exc:
        fail(str(exc))


@kafka_app.command()
def stop() -> None:
    """Stop the broker gracefully."""
    try:
        stop_broker(BrokerSettings(), console)
    except BrokerError as exc:
        fail(str(exc))


@kafka_app.command()
def status() -> None:
    """Say whether the broker runs, with its pid, address and topic count."""
    settings = BrokerSettings()
    pid, topics = broker_status(settings)
    if pid is None:
        console.print("kafka    not running")
        raise typer.Exit(3)
    shown = "unknown (not answering)" if topics is None else str(topics)
    console.print(f"kafka    running, pid {pid}, {bootstrap(settings)}, {shown} topics")
