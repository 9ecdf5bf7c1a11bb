"""The `sluice` command line: broker, topics, services, queries and the demo."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import Progress

from core.config import PipelineConfig, load_config
from core.errors import SluiceError
from core.settings import (
    AppSettings,
    DeliverySettings,
    GatewaySettings,
    KafkaSettings,
    RegistrySettings,
    TransformSettings,
    WarehouseSettings,
    WorkerSettings,
)
from ops.output import fail, iso_ms, print_rows, say_error

app = typer.Typer(
    name="sluice",
    help="Sluice: a Kafka-native event and job pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Create and align the topics the config needs.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
config_app = typer.Typer(help="Validate and apply the pipeline config live.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Pipeline YAML (default: SLUICE_CONFIG_FILE or sluice.yaml)."
    ),
]


def _config(path: Path | None) -> PipelineConfig:
    """The pipeline file, validated (transform modules checked by name, not imported)."""
    try:
        return load_config(path or AppSettings().config_file, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))


def _import_transforms(cfg: PipelineConfig) -> None:
    """Early feedback: import each transform here, as the workers will (allowed modules only)."""
    from core.config import resolve_transforms  # noqa: PLC0415

    try:
        resolve_transforms(cfg, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))


def _setup_logging() -> None:
    from ops.logs import configure_logging  # noqa: PLC0415

    configure_logging(AppSettings().log_level)


@topics_app.command("apply")
def topics_apply(config: ConfigOption = None) -> None:
    """Create missing topics and align partitions and configs; safe to repeat."""
    from core.admin import apply_topics  # noqa: PLC0415
    from core.topics import required_topics  # noqa: PLC0415

    cfg = _config(config)
    kafka = KafkaSettings()
    try:
        changes = apply_topics(required_topics(cfg, kafka), kafka)
    except SluiceError as exc:
        fail(str(exc))
    for change in changes:
        colour = {"created": "green", "updated": "yellow"}.get(change.action, "dim")
        detail = f" ({change.detail})" if change.detail else ""
        out.print(f"[{colour}]{change.action:9}[/{colour}] {change.topic}{detail}", highlight=False)


@config_app.command("apply")
def config_apply(
    path: Annotated[Path, typer.Argument(help="The pipeline YAML to apply.")],
) -> None:
    """Validate FILE, create the topics it needs and publish it; running services follow it."""
    from core.config_topic import apply_config  # noqa: PLC0415

    cfg = _config(path)
    _import_transforms(cfg)
    try:
        apply_config(cfg, KafkaSettings())
    except SluiceError as exc:
        fail(str(exc))
    out.print(
        f"applied {path}: {len(cfg.sources)} sources, {len(cfg.destinations)} destinations; "
        "gateways, workers and sinks switch to it within seconds"
    )


@config_app.command("check")
def config_check(
    path: Annotated[Path, typer.Argument(help="The pipeline YAML to check.")],
) -> None:
    """Validate FILE without applying it (its transforms are imported here to check them)."""
    cfg = _config(path)
    _import_transforms(cfg)
    out.print(f"{path} is valid: {len(cfg.sources)} sources, {len(cfg.destinations)} destinations")


@app.command()
def gateway(config: ConfigOption = None) -> None:
    """Run the HTTP ingestion gateway in the foreground."""
    from gateway.app import run  # noqa: PLC0415

    cfg = _config(config)
    _setup_logging()
    run(GatewaySettings(), KafkaSettings(), cfg, TransformSettings())


@app.command()
def registry() -> None:
    """Run the schema registry (Confluent Schema Registry REST API) in the foreground."""
    from schemas.registry_api import run  # noqa: PLC0415

    _setup_logging()
    run(RegistrySettings(), KafkaSettings())


@app.command()
def worker(config: ConfigOption = None) -> None:
    """Run a stream-processing worker (Faust) in the foreground."""
    from core.topics import Topics  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415
    from streams.agents import run  # noqa: PLC0415
    from streams.processor import Router  # noqa: PLC0415

    cfg = _config(config)
    _setup_logging()
    kafka = KafkaSettings()
    codec = event_codec(logical_types=False)  # routing needs no datetimes
    try:
        router = Router(cfg, Topics(kafka.topic_prefix), codec, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))
    run(WorkerSettings(), kafka, router, cfg)


@app.command()
def sink(config: ConfigOption = None) -> None:
    """Run the warehouse sink (it owns an embedded warehouse) in the foreground."""
    from connectors.warehouse.process import run  # noqa: PLC0415

    cfg = _config(config)
    _setup_logging()
    try:
        run(WarehouseSettings(), KafkaSettings(), cfg, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))


@app.command()
def deliver(config: ConfigOption = None) -> None:
    """Deliver webhook destinations (retry tiers, DLQs) in the foreground; run several to scale."""
    from connectors.delivery.process import run  # noqa: PLC0415

    cfg = _config(config)
    _setup_logging()
    run(DeliverySettings(), KafkaSettings(), cfg, TransformSettings())


@app.command()
def sql(
    query: Annotated[
        str, typer.Argument(help="One read-only statement, e.g. SELECT count() FROM events.")
    ],
    json: Annotated[
        bool, typer.Option("--json", help="Print JSON lines instead of a table.")
    ] = False,
) -> None:
    """Query the warehouse."""
    from ops.warehouse_query import query_warehouse  # noqa: PLC0415

    try:
        columns, rows = query_warehouse(query, WarehouseSettings())
    except SluiceError as exc:
        fail(str(exc))
    if json:
        for row in rows:
            out.print_json(orjson.dumps(dict(zip(columns, row, strict=True)), default=str).decode())
    else:
        print_rows(columns, rows)


@app.command()
def send(
    count: Annotated[int, typer.Option(help="How many sample events.")] = 1000,
    batch: Annotated[int, typer.Option(help="Events per request.")] = 100,
    write_key: Annotated[str, typer.Option(help="The source's write key.")] = "demo-write-key",
    url: Annotated[str | None, typer.Option(help="Gateway URL (default from settings).")] = None,
) -> None:
    """Send sample events to the gateway's /v1/batch."""
    from ops.traffic import sample_events, send_batches  # noqa: PLC0415

    gw = GatewaySettings()
    target = url or f"http://{gw.host}:{gw.port}"
    events = sample_events(count)
    with Progress(console=err) as progress:
        task = progress.add_task("sending", total=count)
        try:
            report = asyncio.run(
                send_batches(
                    target,
                    write_key,
                    events,
                    batch,
                    on_progress=lambda n: progress.advance(task, n),
                )
            )
        except OSError as exc:
            fail(f"cannot reach the gateway at {target}: {exc}")
    out.print(
        f"accepted {report.accepted}, rejected {report.rejected}, failed requests {report.failed_requests}"
    )
    if report.failed_requests or report.accepted == 0:
        raise typer.Exit(1)


@app.command()
def demo(
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop the demo's services and the broker.")
    ] = False,
    events: Annotated[int, typer.Option(help="How many sample events to send.")] = 200,
) -> None:
    """Start broker, gateway, worker and sink, send sample traffic and show warehouse rows."""
    from ops.demo import run_demo, stop_demo  # noqa: PLC0415

    try:
        if stop:
            stop_demo(out)
        else:
            run_demo(out, events)
    except SluiceError as exc:
        fail(str(exc))


@app.command()
def replay(
    destination: Annotated[str, typer.Argument(help="The destination to deliver through.")],
    topic: Annotated[
        str | None,
        typer.Option(
            help="Where to read (default: the destination's topic; the ingest topic routes "
            "through the destination's filter and transform)."
        ),
    ] = None,
    from_offset: Annotated[int | None, typer.Option(help="First offset (each partition).")] = None,
    to_offset: Annotated[int | None, typer.Option(help="Last offset, inclusive.")] = None,
    since: Annotated[str | None, typer.Option(help="Records at or after this ISO time.")] = None,
    until: Annotated[str | None, typer.Option(help="Records at or before this ISO time.")] = None,
    partition: Annotated[
        list[int] | None, typer.Option(help="Only these partitions (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be replayed; send nothing.")
    ] = False,
    rate: Annotated[float | None, typer.Option(help="At most this many records a second.")] = None,
    config: ConfigOption = None,
) -> None:
    """Deliver an offset or time range of a topic through a destination again."""
    from ops.replay import ReplayRange, run_replay  # noqa: PLC0415

    cfg = _config(config)
    try:
        rng = ReplayRange(
            from_offset,
            to_offset,
            iso_ms(since, "since"),
            iso_ms(until, "until"),
            frozenset(partition or ()),
        )
        with Progress(console=err) as progress:
            task = progress.add_task("replaying", total=None)
            report = run_replay(
                KafkaSettings(),
                cfg,
                destination,
                rng,
                topic,
                dry_run,
                rate,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                transforms=TransformSettings(),
            )
    except SluiceError as exc:
        fail(str(exc))
    verb = "would replay" if dry_run else "replayed"
    skipped = (
        f", {report.not_routed} kept back by the destination's rules" if report.not_routed else ""
    )
    out.print(
        f"{verb} {report.produced} records of {report.read} read to {destination}{skipped}; "
        f"replay id {report.id}"
    )


def _mount_kafka() -> None:
    from ops.cli_kafka import kafka_app  # noqa: PLC0415

    app.add_typer(
        kafka_app,
        name="kafka",
        help="Run a local Apache Kafka broker or cluster; its users and ACLs.",
    )


_mount_kafka()


def _mount_dlq() -> None:
    from ops.cli_dlq import dlq_app  # noqa: PLC0415

    app.add_typer(dlq_app, name="dlq", help="Inspect and redrive dead-letter queues.")


_mount_dlq()


def _mount_jobs() -> None:
    from ops.cli_jobs import jobs_app  # noqa: PLC0415

    app.add_typer(jobs_app, name="jobs", help="Run the job worker; submit jobs, see their status.")


_mount_jobs()


def _mount_workflows() -> None:
    from ops.cli_workflows import workflow_app  # noqa: PLC0415

    app.add_typer(
        workflow_app, name="workflow", help="Apply playbooks; run the orchestrator; start runs."
    )


_mount_workflows()


def _mount_bench() -> None:
    from ops.benchmarks import bench_app  # noqa: PLC0415

    app.add_typer(bench_app, name="bench", help="Benchmarks next to same-run baselines.")


_mount_bench()


def main() -> None:
    """Entry point of the `sluice` console script."""
    try:
        app()
    except SluiceError as exc:
        # Commands name their own failures; this catches one that a command did not.
        say_error(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
