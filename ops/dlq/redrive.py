"""Redrive: dead letters sent back to the destination's topic, with an audit trail.

A redrive produces matching records back onto the destination's topic (history headers
added) or, for a job queue (`jobs.<queue>`), each DEAD job back onto its priority topic
to run again (see `ops.dlq.jobs`), and audits itself on `sluice.dlq.audit`:

1. a `start` record (its id, the filter, the counts and the target topic's end offsets)
   before it produces anything; nothing is sent if it cannot be written;
2. the records, each with `sluice.redrive.from` (the DLQ record) and `sluice.redrive.id`;
3. once Kafka confirmed them, `done` records listing what was sent as offset ranges,
   split into parts that each fit the audit topic's `max.message.bytes`.

Records that an earlier redrive sent are skipped, so redriving twice delivers once. A
redrive whose `done` records are missing (it was killed, or the audit write failed) is
finished by the next one: it reads the target topic from the `start` record's offsets,
takes the records carrying that redrive's id as sent, and writes their `done` records.
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import ConfigResource

from core.admin import admin_client
from core.headers import REDRIVE_COUNT, REDRIVE_FROM, REDRIVE_ID, REDRIVE_PREFIX
from core.kafka import Headers, idempotent_producer
from core.settings import KafkaSettings
from core.topics import Topics
from ops.dlq.history import RefSet, redrive_history
from ops.dlq.jobs import JobSkips, Outgoing, plan_job_redrive
from ops.dlq.letters import (
    DeadLetter,
    DlqFilter,
    dead_letters,
    dlq_topic,
    end_offsets,
    job_queue,
    read_topic,
)
from ops.errors import DlqError


@dataclass
class RedriveReport:
    """What a redrive did."""

    matched: int = 0
    skipped: int = 0
    redriven: int = 0
    # Records an unfinished earlier redrive had sent, found on the target and recorded.
    recovered: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    # How many audit records this redrive wrote (the `done` record is split to fit).
    audit_records: int = 0
    # A job queue's redrive: the records it left (jobs not DEAD now, records not jobs).
    jobs: JobSkips | None = None


# Room left in an audit message for Kafka's record and batch framing and the key.
_FRAMING = 256
# What librdkafka refuses to send whatever the topic says (its message.max.bytes).
_CLIENT_MAX = 1_000_000


def audit_limit(kafka: KafkaSettings, timeout: float = 10.0) -> int:
    """The largest audit record the audit topic takes (its `max.message.bytes`, framing off)."""
    topic = Topics(kafka.topic_prefix).dlq_audit
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        admin = admin_client(kafka)  # held until the answer is in: its end cancels the call
        configs = admin.describe_configs([resource])[resource].result(timeout)
        limit = int(configs["max.message.bytes"].value)
    except (KafkaException, KeyError, ValueError) as exc:
        raise DlqError(f"cannot read max.message.bytes of {topic}: {exc}") from exc
    return min(limit, _CLIENT_MAX) - _FRAMING


def _parts(audit: dict[str, Any], records: list[str], limit: int) -> list[dict[str, Any]]:
    """`audit` with `records` spread over as few records as fit in `limit` bytes each."""
    base = len(orjson.dumps({**audit, "part": 1 << 30, "parts": 1 << 30, "records": []}))
    chunks: list[list[str]] = [[]]
    size = base
    for text in records:
        cost = len(text) + 3  # the quotes and a comma
        if base + cost > limit:
            raise DlqError(f"the audit topic's max.message.bytes is too small ({limit} bytes)")
        if size + cost > limit:
            chunks.append([])
            size = base
        chunks[-1].append(text)
        size += cost
    return [
        {**audit, "part": i, "parts": len(chunks), "records": chunk}
        for i, chunk in enumerate(chunks)
    ]


class _Audit:
    """Writes audit records one at a time, each confirmed before the next step."""

    def __init__(self, kafka: KafkaSettings, producer: Producer, key: bytes) -> None:
        self.topic = Topics(kafka.topic_prefix).dlq_audit
        self.producer = producer
        self.key = key
        self.limit = audit_limit(kafka) - len(key)
        self.written = 0

    def write(self, record: dict[str, Any], what: str) -> None:
        body = orjson.dumps(record)
        if len(body) > self.limit:
            raise DlqError(
                f"the {what} does not fit the audit topic's max.message.bytes "
                f"({len(body)} > {self.limit} bytes)"
            )
        failures: list[str] = []
        self.producer.produce(
            self.topic,
            body,
            self.key,
            on_delivery=lambda err, _m: failures.append(err.str()) if err else None,
        )
        if self.producer.flush(30) or failures:
            raise DlqError(f"the {what} was not written: {failures[:1] or 'timeout'}")
        self.written += 1

    def write_parts(self, audit: dict[str, Any], records: list[str], what: str) -> None:
        write = str(uuid.uuid4())
        for part in _parts({**audit, "write": write}, records, self.limit):
            self.write(part, what)


def _sent_by(kafka: KafkaSettings, start: dict[str, Any], dlq: str) -> RefSet:
    """The DLQ records the redrive of `start` put on its target topic."""
    found = RefSet()
    run = str(start["id"]).encode()
    # A job queue's redrive writes to several priority topics (`targets`), a
    # destination's to one (`target`, `target_offsets`).
    targets = start.get("targets") or {start["target"]: start.get("target_offsets", {})}
    for target, target_offsets in dict(targets).items():
        offsets = {int(p): int(o) for p, o in dict(target_offsets).items()}
        for msg in read_topic(kafka, str(target), start=offsets):
            headers = dict(msg.headers() or [])
            origin = (headers.get(REDRIVE_FROM) or b"").decode("utf-8", "replace")
            if headers.get(REDRIVE_ID) == run and origin.startswith(f"{dlq}:"):
                found.add_text(origin.removeprefix(f"{dlq}:"))
    return found


def _event_headers(rec: DeadLetter, dlq: str, run: str) -> Headers:
    """A dead letter's headers for its redrive: all of them, with the redrive history."""
    try:
        count = int(rec.headers.get(REDRIVE_COUNT, "0")) + 1
    except ValueError:
        count = 1
    out: Headers = [
        (k, v.encode()) for k, v in rec.headers.items() if not k.startswith(REDRIVE_PREFIX)
    ]
    out += [
        (REDRIVE_COUNT, str(count).encode()),
        (REDRIVE_FROM, f"{dlq}:{rec.ref}".encode()),
        (REDRIVE_ID, run.encode()),
    ]
    return out


def _identity() -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(),
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
    }


def redrive(
    kafka: KafkaSettings,
    destination: str,
    flt: DlqFilter,
    dry_run: bool = False,
    rate: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    limit: int | None = None,
) -> RedriveReport:
    """Send matching DLQ records back to the destination's topic (or, for `jobs.<queue>`,
    DEAD jobs back to their priority topics), at most `rate` a second and at most `limit`.

    Safe to run again after any failure: nothing is sent before the `start` audit record
    is written, and a redrive that did not write its `done` records is finished (from
    the target topic's records) by the next run before that run picks what to send.
    """
    topics = Topics(kafka.topic_prefix)
    queue = job_queue(destination)
    dlq = dlq_topic(kafka, destination)
    records = dead_letters(kafka, destination, flt)
    history = redrive_history(kafka, destination)
    producer = idempotent_producer(kafka)
    audit = _Audit(kafka, producer, destination.encode())
    report = RedriveReport()
    for start in history.unfinished:
        sent = _sent_by(kafka, start, dlq)
        report.recovered += len(sent)
        for text in sent.texts():
            history.done.add_text(text)
        if not dry_run:
            recovered = {
                **start,
                **_identity(),
                "kind": "done",
                "recovered": True,
                "redriven": len(sent),
            }
            audit.write_parts(recovered, sent.texts(), "audit of an unfinished redrive")
    todo = [r for r in records if r.ref not in history.done]
    report.matched, report.skipped = len(records), len(records) - len(todo)
    run = str(uuid.uuid4())
    outgoing: list[Outgoing]
    if queue is None:
        target = topics.destination(destination).main
        outgoing = [
            Outgoing(r, target, None, r.key, r.value, _event_headers(r, dlq, run)) for r in todo
        ]
    else:
        outgoing, report.jobs = plan_job_redrive(kafka, queue, todo, dlq, run)
    if limit is not None:
        outgoing = outgoing[: max(0, limit)]
    report.audit = {
        "id": run,
        "destination": destination,
        **_identity(),
        "dry_run": dry_run,
        "filter": {
            "error_class": flt.error_class,
            "since_ms": flt.since_ms,
            "until_ms": flt.until_ms,
            "refs": sorted(flt.refs),
            "limit": limit,
        },
        "matched": report.matched,
        "skipped_already_redriven": report.skipped,
    }
    if report.jobs is not None:
        report.audit |= {
            "queue": queue,
            "skipped_not_dead": len(report.jobs.not_dead),
            "skipped_not_jobs": len(report.jobs.not_jobs),
        }
    if outgoing and not dry_run:
        targets = sorted({o.topic for o in outgoing})
        offsets = {t: {str(p): o for p, o in end_offsets(kafka, t).items()} for t in targets}
        begin: dict[str, Any] = {
            **report.audit,
            "kind": "start",
            "todo": len(outgoing),
            "target": targets[0],
            "target_offsets": offsets[targets[0]],
        }
        if queue is not None:
            begin["targets"] = offsets
        audit.write(begin, "start of the redrive's audit (nothing was sent)")
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    sent = RefSet()
    started = time.monotonic()
    for i, out in enumerate(outgoing):
        if rate:
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if not dry_run:
            extra: dict[str, Any] = {} if out.partition is None else {"partition": out.partition}
            producer.produce(
                out.topic,
                out.value,
                out.key,
                headers=out.headers,
                on_delivery=delivered,
                **extra,
            )
            producer.poll(0)
        sent.add(out.rec.partition, out.rec.offset)
        report.redriven += 1
        if on_progress:
            on_progress(i + 1, len(outgoing))
    if producer.flush(60) or failures:
        raise DlqError(
            f"redrive not confirmed by Kafka: {failures[:1] or 'timeout'}; "
            "run it again to send what is missing"
        )
    report.audit |= {"kind": "done", "redriven": 0 if dry_run else report.redriven}
    audit.write_parts(
        report.audit,
        sent.texts(),
        "audit of the redrive (its records are sent; the next redrive records them)",
    )
    report.audit_records = audit.written
    return report
