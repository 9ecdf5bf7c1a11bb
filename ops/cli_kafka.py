"""`sluice kafka start|stop|status`: the local broker, or a local cluster of them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from core.settings import BrokerSettings
from ops.errors import BrokerError
from ops.kafka_broker import (
    cluster_nodes_on_disk,
    cluster_status,
    start_broker,
    start_node,
    stop_broker,
    stop_node,
)
from ops.output import fail, print_rows

kafka_app = typer.Typer(no_args_is_help=True)
console = Console()

BrokersOption = Annotated[
    int | None,
    typer.Option(
        "--brokers",
        min=1,
        max=9,
        help="Nodes of the cluster (default: SLUICE_BROKER_BROKERS, or what the state folder"
        " holds).",
    ),
]
NodeOption = Annotated[
    int | None, typer.Option("--node", min=1, help="Only this node of the cluster (1, 2, ...).")
]


def _settings(brokers: int | None) -> BrokerSettings:
    settings = BrokerSettings()
    if brokers is not None:
        return settings.model_copy(update={"brokers": brokers})
    on_disk = cluster_nodes_on_disk(settings)
    return settings.model_copy(update={"brokers": on_disk}) if on_disk else settings


@kafka_app.command()
def start(brokers: BrokersOption = None, node: NodeOption = None) -> None:
    """Start the broker, or every node of a cluster (resolving the jars on first use); a
    no-op for what runs."""
    try:
        settings = _settings(brokers)
        if node is not None:
            pid = start_node(settings, node, console)
            console.print(f"kafka    node {node} running, pid {pid}")
        else:
            start_broker(settings, console)
    except BrokerError as exc:
        fail(str(exc))


@kafka_app.command()
def stop(node: NodeOption = None) -> None:
    """Stop the broker (every node of a cluster, or one) gracefully."""
    try:
        settings = _settings(None)
        if node is not None:
            stop_node(settings, node, console)
        else:
            stop_broker(settings, console)
    except BrokerError as exc:
        fail(str(exc))


@kafka_app.command()
def status() -> None:
    """Every node (pid, address, answering), the controller, and the partitions that are
    under-replicated or without a leader; exit 3 when no node runs."""
    try:
        settings = _settings(None)
        found = cluster_status(settings)
    except BrokerError as exc:
        fail(str(exc))
    if all(n.pid is None for n in found.nodes):
        console.print("kafka    not running")
        raise typer.Exit(3)
    if len(found.nodes) == 1:
        (one,) = found.nodes
        shown = "unknown (not answering)" if found.topics is None else str(found.topics)
        console.print(f"kafka    running, pid {one.pid}, {one.node.address}, {shown} topics")
        return
    print_rows(
        ["node", "address", "pid", "state", "role"],
        [
            [
                str(n.node.node_id),
                n.node.address,
                "-" if n.pid is None else str(n.pid),
                "answering" if n.answering else ("not answering" if n.pid else "stopped"),
                "controller (active)" if n.node.node_id == found.controller else "broker, voter",
            ]
            for n in found.nodes
        ],
        title=f"Kafka {settings.version}: {len(found.nodes)} nodes, {found.topics} topics",
    )
    console.print(
        f"under-replicated partitions: {len(found.under_replicated)}"
        + (f" ({', '.join(found.under_replicated[:10])} ...)" if found.under_replicated else "")
    )
    console.print(
        f"partitions without a leader: {len(found.offline)}"
        + (f" ({', '.join(found.offline[:10])} ...)" if found.offline else "")
    )
