"""Dead-letter queues: list, show and redrive records, with an audit trail.

A DLQ record keeps the original key and value and says in its headers where it came
from and why it failed. A redrive produces matching records back onto the
destination's topic (history headers added) and audits itself on `sluice.dlq.audit`:

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

import bisect
import getpass
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import ConfigResource

from core.admin import admin_client
from core.headers import REDRIVE_COUNT, REDRIVE_FROM, REDRIVE_ID, REDRIVE_PREFIX
from core.kafka import Headers
from core.settings import KafkaSettings
from core.topics import Topics
from ops.errors import DlqError


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


def read_topic(
    kafka: KafkaSettings,
    topic: str,
    timeout: float = 10.0,
    start: dict[int, int] | None = None,
) -> Iterator[Any]:
    """Every record of `topic` up to its end now, read without a consumer group's commits.

    `start` (partition -> offset) skips what comes before those offsets.
    """
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
            low = max(low, (start or {}).get(p, low))
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


def end_offsets(kafka: KafkaSettings, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """Partition -> the offset the next record of `topic` gets."""
    consumer = Consumer(kafka.client_config() | {"group.id": f"sluice-reader-{uuid.uuid4().hex}"})
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            raise DlqError(f"topic {topic} does not exist")
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in meta.topics[topic].partitions
        }
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


class RefSet:
    """DLQ records (`partition:offset`) as sorted offset ranges per partition."""

    def __init__(self) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        self._dirty: set[int] = set()

    def add(self, partition: int, first: int, last: int | None = None) -> None:
        """Add one offset or the range first..last."""
        self._ranges.setdefault(partition, []).append((first, first if last is None else last))
        self._dirty.add(partition)

    def add_text(self, text: str) -> None:
        """Add `p:o` or `p:a-b` as the audit records write them (junk is ignored)."""
        part, _, span = text.partition(":")
        first, _, last = span.partition("-")
        try:
            self.add(int(part), int(first), int(last) if last else None)
        except ValueError:
            return

    def _merged(self, partition: int) -> list[tuple[int, int]]:
        ranges = self._ranges.get(partition, [])
        if partition in self._dirty:
            merged: list[tuple[int, int]] = []
            for first, last in sorted(ranges):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], last))
                else:
                    merged.append((first, last))
            ranges = self._ranges[partition] = merged
            self._dirty.discard(partition)
        return ranges

    def __contains__(self, ref: object) -> bool:
        if not isinstance(ref, str):
            return False
        part, _, offset = ref.partition(":")
        try:
            p, o = int(part), int(offset)
        except ValueError:
            return False
        ranges = self._merged(p)
        i = bisect.bisect_right(ranges, (o, 1 << 62)) - 1
        return i >= 0 and ranges[i][0] <= o <= ranges[i][1]

    def __len__(self) -> int:
        return sum(b - a + 1 for p in list(self._ranges) for a, b in self._merged(p))

    def texts(self) -> list[str]:
        """The ranges as `p:o` / `p:a-b`, partition by partition."""
        return [
            f"{p}:{a}" if a == b else f"{p}:{a}-{b}"
            for p in sorted(self._ranges)
            for a, b in self._merged(p)
        ]


@dataclass
class RedriveHistory:
    """What the audit topic says about the redrives of one destination."""

    done: RefSet = field(default_factory=RefSet)
    # `start` records of redrives whose `done` records are not all there.
    unfinished: list[dict[str, Any]] = field(default_factory=list)


def redrive_history(kafka: KafkaSettings, destination: str) -> RedriveHistory:
    """The DLQ records earlier redrives of `destination` sent, and those left unfinished."""
    history = RedriveHistory()
    starts: dict[str, dict[str, Any]] = {}
    parts: dict[tuple[str, str], set[int]] = {}
    complete: set[str] = set()
    for msg in read_topic(kafka, Topics(kafka.topic_prefix).dlq_audit):
        try:
            audit = orjson.loads(msg.value() or b"{}")
        except orjson.JSONDecodeError:
            continue
        if not isinstance(audit, dict) or audit.get("destination") != destination:
            continue
        if audit.get("dry_run"):
            continue
        kind, run = audit.get("kind"), str(audit.get("id"))
        if kind == "start":
            starts[run] = audit
            continue
        for text in audit.get("records", []):
            history.done.add_text(str(text))
        if kind == "done":
            write = (run, str(audit.get("write")))
            seen = parts.setdefault(write, set())
            seen.add(int(audit.get("part", 0)))
            if len(seen) >= int(audit.get("parts", 1)):
                complete.add(run)
    history.unfinished = [a for run, a in starts.items() if run not in complete]
    return history


def redriven_refs(kafka: KafkaSettings, destination: str) -> RefSet:
    """DLQ records (`partition:offset`) that earlier redrives of `destination` sent."""
    return redrive_history(kafka, destination).done


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
    offsets = {int(p): int(o) for p, o in dict(start.get("target_offsets", {})).items()}
    for msg in read_topic(kafka, str(start["target"]), start=offsets):
        headers = dict(msg.headers() or [])
        origin = (headers.get(REDRIVE_FROM) or b"").decode("utf-8", "replace")
        if headers.get(REDRIVE_ID) == run and origin.startswith(f"{dlq}:"):
            found.add_text(origin.removeprefix(f"{dlq}:"))
    return found


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
) -> RedriveReport:
    """Send matching DLQ records back to the destination's topic, at most `rate` a second.

    Safe to run again after any failure: nothing is sent before the `start` audit record
    is written, and a redrive that did not write its `done` records is finished (from
    the target topic's records) by the next run before that run picks what to send.
    """
    topics = Topics(kafka.topic_prefix)
    dest = topics.destination(destination)
    target, dlq = dest.main, dest.dlq
    records = dead_letters(kafka, destination, flt)
    history = redrive_history(kafka, destination)
    producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all"})
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
    report.audit = {
        "id": run,
        "destination": destination,
        **_identity(),
        "dry_run": dry_run,
        "filter": {
            "error_class": flt.error_class,
            "since_ms": flt.since_ms,
            "until_ms": flt.until_ms,
        },
        "matched": report.matched,
        "skipped_already_redriven": report.skipped,
    }
    if todo and not dry_run:
        audit.write(
            {
                **report.audit,
                "kind": "start",
                "todo": len(todo),
                "target": target,
                "target_offsets": {str(p): o for p, o in end_offsets(kafka, target).items()},
            },
            "start of the redrive's audit (nothing was sent)",
        )
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    sent = RefSet()
    started = time.monotonic()
    for i, rec in enumerate(todo):
        if rate:
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if not dry_run:
            count = int(rec.headers.get(REDRIVE_COUNT, "0")) + 1
            history_headers: Headers = [
                (k, v.encode()) for k, v in rec.headers.items() if not k.startswith(REDRIVE_PREFIX)
            ]
            history_headers += [
                (REDRIVE_COUNT, str(count).encode()),
                (REDRIVE_FROM, f"{dlq}:{rec.ref}".encode()),
                (REDRIVE_ID, run.encode()),
            ]
            producer.produce(
                target, rec.value, rec.key, headers=history_headers, on_delivery=delivered
            )
            producer.poll(0)
        sent.add(rec.partition, rec.offset)
        report.redriven += 1
        if on_progress:
            on_progress(i + 1, len(todo))
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
