"""Dead-letter queues: list, show and redrive records, with an audit trail.

A DLQ record keeps the original key and value and says in its headers where it came
from and why it failed. A redrive produces matching records back onto the
destination's topic (history headers added) and writes one audit record; records that
an earlier redrive already sent are skipped, so redriving twice delivers once.
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from ops.producer import Headers
from ops.settings import KafkaSettings
from ops.topics import Topics
from schemas.errors import SluiceError


class DlqError(SluiceError):
    """A DLQ operation could not be done."""


@dataclass(frozen=True)
class DeadLetter:
    """One record of a DLQ topic."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    @property
    def ref(self) -> str:
        """`partition:offset`, how commands name a record."""
        return f"{self.partition}:{self.offset}"

    @property
    def error_class(self) -> str:
        """The class of the error that sent it here."""
        return self.headers.get("sluice.error.class", "")


@dataclass(frozen=True)
class DlqFilter:
    """Which records a command applies to; empty fields match everything."""

    error_class: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    refs: frozenset[str] = field(default_factory=frozenset)

    def matches(self, rec: DeadLetter) -> bool:
        """Whether `rec` passes every set condition."""
        if self.error_class and rec.error_class != self.error_class:
            return False
        if self.since_ms is not None and rec.timestamp_ms < self.since_ms:
            return False
        if self.until_ms is not None and rec.timestamp_ms > self.until_ms:
            return False
        return not self.refs or rec.ref in self.refs


def read_topic(kafka: KafkaSettings, topic: str, timeout: float = 10.0) -> Iterator[Any]:
    """Every record of `topic` up to its end now, read without a consumer group's commits."""
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"sluice-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            raise DlqError(f"topic {topic} does not exist")
        parts = []
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                parts.append(TopicPartition(topic, p, low))
        if not parts:
            return
        consumer.assign(parts)
        open_parts = {tp.partition for tp in parts}
        deadline = time.monotonic() + timeout
        while open_parts:
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() > deadline:
                    raise DlqError(f"reading {topic} timed out")
                continue
            deadline = time.monotonic() + timeout
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(msg.partition())
                    continue
                raise DlqError(f"reading {topic}: {err.str()}")
            yield msg
    finally:
        consumer.close()


def dead_letters(
    kafka: KafkaSettings, destination: str, flt: DlqFilter | None = None
) -> list[DeadLetter]:
    """The records of a destination's DLQ that match `flt`, oldest first per partition."""
    topic = Topics(kafka.topic_prefix).destination(destination).dlq
    out = []
    for msg in read_topic(kafka, topic):
        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}
        rec = DeadLetter(
            msg.partition(),
            msg.offset(),
            msg.timestamp()[1],
            msg.key(),
            msg.value() or b"",
            headers,
        )
        if flt is None or flt.matches(rec):
            out.append(rec)
    return out


def redriven_refs(kafka: KafkaSettings, destination: str) -> set[str]:
    """DLQ records (`partition:offset`) that earlier redrives of `destination` sent."""
    done: set[str] = set()
    for msg in read_topic(kafka, Topics(kafka.topic_prefix).dlq_audit):
        audit = orjson.loads(msg.value() or b"{}")
        if audit.get("destination") == destination and not audit.get("dry_run"):
            done.update(audit.get("records", []))
    return done


@dataclass
class RedriveReport:
    """What a redrive did."""

    matched: int = 0
    skipped: int = 0
    redriven: int = 0
    audit: dict[str, Any] = field(default_factory=dict)


def redrive(
    kafka: KafkaSettings,
    destination: str,
    flt: DlqFilter,
    dry_run: bool = False,
    rate: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RedriveReport:
    """Send matching DLQ records back to the destination's topic, at most `rate` a second."""
    topics = Topics(kafka.topic_prefix)
    target = topics.destination(destination).main
    records = dead_letters(kafka, destination, flt)
    done = redriven_refs(kafka, destination)
    todo = [r for r in records if r.ref not in done]
    report = RedriveReport(matched=len(records), skipped=len(records) - len(todo))
    producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all"})
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    started = time.monotonic()
    for i, rec in enumerate(todo):
        if rate:
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if not dry_run:
            count = int(rec.headers.get("sluice.redrive.count", "0")) + 1
            history: Headers = [
                (k, v.encode())
                for k, v in rec.headers.items()
                if not k.startswith("sluice.redrive.")
            ]
            history += [
                ("sluice.redrive.count", str(count).encode()),
                (
                    "sluice.redrive.from",
                    f"{topics.destination(destination).dlq}:{rec.ref}".encode(),
                ),
            ]
            producer.produce(target, rec.value, rec.key, headers=history, on_delivery=delivered)
            producer.poll(0)
        report.redriven += 1
        if on_progress:
            on_progress(i + 1, len(todo))
    if producer.flush(60) or failures:
        raise DlqError(f"redrive not confirmed by Kafka: {failures[:1] or 'timeout'}")
    report.audit = {
        "id": str(uuid.uuid4()),
        "destination": destination,
        "at": datetime.now(UTC).isoformat(),
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
        "dry_run": dry_run,
        "filter": {
            "error_class": flt.error_class,
            "since_ms": flt.since_ms,
            "until_ms": flt.until_ms,
        },
        "matched": report.matched,
        "skipped_already_redriven": report.skipped,
        "redriven": 0 if dry_run else report.redriven,
        "records": [r.ref for r in todo],
    }
    producer.produce(topics.dlq_audit, orjson.dumps(report.audit), destination.encode())
    if producer.flush(30):
        raise DlqError("the audit record was not confirmed by Kafka")
    return report
