"""`sluice kafka start|stop|status`: the local broker, or a local cluster of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core.acls import ROLES as ACL_ROLES
from core.acls import Names, apply_acls, apply_users, bindings, role_grants
from core.config import PipelineConfig
from core.errors import SluiceError
from core.settings import (
    AppSettings,
    BrokerSettings,
    KafkaSettings,
    KafkaUsersSettings,
    TransformSettings,
)
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


SaslOption = Annotated[
    bool,
    typer.Option(
        "--sasl",
        help="Authenticated mode: SASL/SCRAM users per role and ACLs (when the state folder is"
        " first formatted; credentials in <state>/credentials/<role>.env).",
    ),
]


def _settings(brokers: int | None, sasl: bool = False) -> BrokerSettings:
    settings = BrokerSettings()
    if sasl:
        settings = settings.model_copy(update={"sasl": True})
    if brokers is not None:
        return settings.model_copy(update={"brokers": brokers})
    on_disk = cluster_nodes_on_disk(settings)
    return settings.model_copy(update={"brokers": on_disk}) if on_disk else settings


@kafka_app.command()
def start(brokers: BrokersOption = None, node: NodeOption = None, sasl: SaslOption = False) -> None:
    """Start the broker, or every node of a cluster (resolving the jars on first use); a
    no-op for what runs."""
    try:
        settings = _settings(brokers, sasl)
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


users_app = typer.Typer(no_args_is_help=True)
kafka_app.add_typer(
    users_app, name="users", help="SCRAM users of Sluice's roles on a cluster of your own."
)


@users_app.command("apply")
def users_apply() -> None:
    """Create or update the SCRAM user of each role with a password in
    SLUICE_KAFKA_USERS_<ROLE>_PASSWORD (as the admin user of SLUICE_KAFKA_*); safe to repeat."""
    kafka = KafkaSettings()
    try:
        done = apply_users(kafka, KafkaUsersSettings())
    except SluiceError as exc:
        fail(str(exc))
    if not done:
        fail("no SLUICE_KAFKA_USERS_<ROLE>_PASSWORD set: no user to create")
    console.print(f"users    {', '.join(done)} in place at {kafka.bootstrap_servers}")


acls_app = typer.Typer(no_args_is_help=True)
kafka_app.add_typer(
    acls_app, name="acls", help="Least-privilege ACLs of Sluice's roles (authenticated mode)."
)
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="The pipeline YAML (default: SLUICE_CONFIG_FILE)."),
]
RoleOption = Annotated[
    list[str] | None,
    typer.Option("--role", help="Only these roles (repeat; default: every role)."),
]


def _grants_of(config: Path | None, roles: list[str] | None) -> tuple[list[str], PipelineConfig]:
    from core.config import load_config  # noqa: PLC0415

    unknown = sorted(set(roles or ()) - set(ACL_ROLES))
    if unknown:
        fail(f"no role {', '.join(unknown)}: one of {', '.join(ACL_ROLES)}")
    try:
        cfg = load_config(config or AppSettings().config_file, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))
    return list(roles or ACL_ROLES), cfg


@acls_app.command("show")
def acls_show(config: ConfigOption = None, role: RoleOption = None) -> None:
    """The ACLs each role needs for the pipeline: topics, groups, transactional ids."""
    roles, cfg = _grants_of(config, role)
    kafka, names = KafkaSettings(), Names.from_env()
    print_rows(
        ["role (user)", "operation", "resource"],
        [[r, g.operation, g.shown()] for r in roles for g in role_grants(r, cfg, kafka, names)],
        title=f"ACLs for prefix {kafka.topic_prefix}; admin is a super user",
    )


@acls_app.command("apply")
def acls_apply(
    config: ConfigOption = None,
    role: RoleOption = None,
    user: Annotated[
        list[str] | None,
        typer.Option("--user", help="role=user when a role logs in under another name (repeat)."),
    ] = None,
) -> None:
    """Create the ACLs of every role (as the admin user of SLUICE_KAFKA_*); safe to repeat."""
    roles, cfg = _grants_of(config, role)
    users = dict(pair.split("=", 1) for pair in user or () if "=" in pair)
    if len(users) != len(user or ()):
        fail("--user takes role=user")
    kafka = KafkaSettings()
    try:
        count = apply_acls(kafka, bindings(cfg, kafka, Names.from_env(), users, roles))
    except SluiceError as exc:
        fail(str(exc))
    console.print(
        f"acls     {count} ACLs of {len(roles)} roles in place at {kafka.bootstrap_servers}"
    )
