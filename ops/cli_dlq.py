"""`sluice dlq list|show|redrive`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from core.settings import KafkaSettings
from ops.dlq import DlqFilter, dead_letters, redrive
from ops.errors import DlqError
from ops.output import fail, iso_ms

dlq_app = typer.Typer(no_args_is_help=True)
console = Console()

Destination = Annotated[str, typer.Argument(help="The destination whose DLQ to use.")]
ErrorClass = Annotated[
    str | None, typer.Option(help="Only records that failed with this error class.")
]
Since = Annotated[
    str | None, typer.Option(help="Only records dead-lettered at or after this ISO time.")
]
Until = Annotated[
    str | None, typer.Option(help="Only records dead-lettered at or before this ISO time.")
]


def _filter(
    error_class: str | None, since: str | None, until: str | None, refs: list[str] | None = None
) -> DlqFilter:
    return DlqFilter(
        error_class, iso_ms(since, "since"), iso_ms(until, "until"), frozenset(refs or ())
    )


@dlq_app.command("list")
def list_(
    destination: Destination,
    error_class: ErrorClass = None,
    since: Since = None,
    until: Until = None,
) -> None:
    """List dead letters: where they came from and why they failed."""
    try:
        records = dead_letters(KafkaSettings(), destination, _filter(error_class, since, until))
    except DlqError as exc:
        fail(str(exc))
    table = Table(title=f"DLQ of {destination}: {len(records)} records", title_justify="left")
    for col in ("ref", "dead-lettered", "error", "message", "attempts", "from"):
        table.add_column(col, overflow="fold")
    for rec in records:
        h = rec.headers
        table.add_row(
            rec.ref,
            datetime.fromtimestamp(rec.timestamp_ms / 1000, UTC).isoformat(timespec="seconds"),
            rec.error_class,
            h.get("sluice.error.message", "")[:80],
            h.get("sluice.attempts", ""),
            f"{h.get('sluice.original.topic', '')}:{h.get('sluice.original.partition', '')}:{h.get('sluice.original.offset', '')}",
        )
    console.print(table)


@dlq_app.command()
def show(
    destination: Destination, ref: Annotated[str, typer.Argument(help="partition:offset")]
) -> None:
    """Show one dead letter: every header and the event."""
    try:
        records = dead_letters(KafkaSettings(), destination, DlqFilter(refs=frozenset({ref})))
    except DlqError as exc:
        fail(str(exc))
    if not records:
        fail(f"no record {ref} in the DLQ of {destination}")
    rec = records[0]
    from schemas.codec import event_codec  # noqa: PLC0415

    try:
        event = event_codec(logical_types=False).decode(rec.value)
    except Exception:
        event = {"raw": rec.value.decode("utf-8", "replace")}
    console.print_json(
        orjson.dumps(
            {
                "ref": rec.ref,
                "key": (rec.key or b"").decode("utf-8", "replace"),
                "headers": rec.headers,
                "event": event,
            }
        ).decode()
    )


@dlq_app.command("redrive")
def redrive_(
    destination: Destination,
    error_class: ErrorClass = None,
    since: Since = None,
    until: Until = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be redriven; send nothing.")
    ] = False,
    rate: Annotated[float | None, typer.Option(help="At most this many records a second.")] = None,
) -> None:
    """Send dead letters back to the destination (each at most once), with audit records."""
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("redriving", total=None)
        try:
            report = redrive(
                KafkaSettings(),
                destination,
                _filter(error_class, since, until),
                dry_run,
                rate,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        except DlqError as exc:
            fail(str(exc))
    verb = "would redrive" if dry_run else "redrove"
    if report.recovered:
        console.print(
            f"an earlier redrive had sent {report.recovered} records without auditing them: "
            "found on the destination's topic and "
            + ("counted as redriven" if dry_run else "audited now")
        )
    console.print(
        f"{verb} {report.redriven} of {report.matched} matching records "
        f"({report.skipped} already redriven); audit {report.audit['id']}"
        f" in {report.audit_records} record{'s' if report.audit_records != 1 else ''}"
    )
