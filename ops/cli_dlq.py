"""`sluice dlq list|show|redrive`: a destination's DLQ by its id, a job queue's as
`jobs.<queue>`; `sluice dlq list` alone lists every DLQ on the broker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from core.settings import KafkaSettings
from ops.dlq import (
    DeadLetter,
    DlqFilter,
    RedriveReport,
    dead_jobs,
    dead_letters,
    dlq_overview,
    job_queue,
    redrive,
)
from ops.errors import DlqError
from ops.output import fail, iso_ms

dlq_app = typer.Typer(no_args_is_help=True)
console = Console()

_NAME_HELP = "The destination whose DLQ to use, or jobs.<queue> for a job queue's."
Destination = Annotated[str, typer.Argument(help=_NAME_HELP)]
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


def _when(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _overview() -> None:
    try:
        found = dlq_overview(KafkaSettings())
    except DlqError as exc:
        fail(str(exc))
    table = Table(title=f"DLQs: {len(found)}", title_justify="left")
    for col in ("name", "kind", "topic", "records"):
        table.add_column(col, overflow="fold")
    for dlq in found:
        table.add_row(dlq.name, dlq.kind, dlq.topic, str(dlq.records))
    console.print(table)


def _list_jobs(name: str, records: list[DeadLetter]) -> None:
    table = Table(title=f"DLQ of {name}: {len(records)} dead jobs", title_justify="left")
    for col in ("ref", "dead", "job", "prio", "attempts", "error", "message", "payload"):
        table.add_column(col, overflow="fold")
    for dead in dead_jobs(records):
        h = dead.letter.headers
        table.add_row(
            dead.letter.ref,
            _when(dead.letter.timestamp_ms),
            dead.id or "(not a job)",
            "" if dead.priority is None else str(dead.priority),
            h.get("sluice.attempts", ""),
            dead.letter.error_class,
            h.get("sluice.error.message", "")[:80],
            dead.preview(),
        )
    console.print(table)


@dlq_app.command("list")
def list_(
    destination: Annotated[
        str | None,
        typer.Argument(help=_NAME_HELP + " Without it: every DLQ and its record count."),
    ] = None,
    error_class: ErrorClass = None,
    since: Since = None,
    until: Until = None,
) -> None:
    """List dead letters (or dead jobs): where they came from and why they failed."""
    if destination is None:
        _overview()
        return
    try:
        records = dead_letters(KafkaSettings(), destination, _filter(error_class, since, until))
    except DlqError as exc:
        fail(str(exc))
    if job_queue(destination) is not None:
        _list_jobs(destination, records)
        return
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
    """Show one dead letter: every header and the event (or the dead job)."""
    try:
        records = dead_letters(KafkaSettings(), destination, DlqFilter(refs=frozenset({ref})))
    except DlqError as exc:
        fail(str(exc))
    if not records:
        fail(f"no record {ref} in the DLQ of {destination}")
    rec = records[0]
    if job_queue(destination) is not None:
        shown = dead_jobs([rec])[0].describe()
        for name in ("first_failure", "last_failure", "dead_lettered"):
            shown[name] = _when(shown.pop(f"{name}_ms")) or None
        console.print_json(orjson.dumps(shown).decode())
        return
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
    ref: Annotated[
        list[str] | None,
        typer.Option(help="Only this record (partition:offset); may be given again."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=0, help="At most this many records (the oldest first).")
    ] = None,
) -> None:
    """Send dead letters back to the destination (each at most once), with audit records.

    For jobs.<queue>: each matching job whose status is DEAD goes back to its priority
    topic to run again under its id, from attempt 1; jobs not DEAD now are named and left.
    """
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("redriving", total=None)
        try:
            report = redrive(
                KafkaSettings(),
                destination,
                _filter(error_class, since, until, ref),
                dry_run,
                rate,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                limit=limit,
            )
        except DlqError as exc:
            fail(str(exc))
    _say_skipped(report)
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


def _say_skipped(report: RedriveReport) -> None:
    """What a job queue's redrive left in its DLQ, and why."""
    skips = report.jobs
    if skips is None:
        return
    for job_id, state in skips.not_dead:
        why = "has no status" if state == "unknown" else f"is {state} now"
        console.print(f"job {job_id} {why}: not redriven")
    if skips.not_jobs:
        console.print(
            f"{len(skips.not_jobs)} records hold no job and stay: {', '.join(skips.not_jobs[:5])}"
        )
    if skips.older:
        console.print(
            f"{len(skips.older)} older records of jobs redriven from a later record: "
            + ", ".join(skips.older[:5])
        )
