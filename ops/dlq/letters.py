"""Dead letters: the records of a DLQ, read to its end now and filtered.

A DLQ record keeps the original key and value and says in its headers where it came
from and why it failed. A DLQ is named by its destination (`crm`: `sluice.dest.crm.dlq`)
or, for a job queue, `jobs.<queue>` (`sluice.jobs.<queue>.dlq`); destination ids and
queue names have no dots, so the two never meet.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

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


# How a command names the DLQ of a job queue: `jobs.<queue>`.
JOBS_PREFIX = "jobs."


def job_queue(name: str) -> str | None:
    """The job queue a DLQ name means (`jobs.<queue>`), or None for a destination."""
    return name.removeprefix(JOBS_PREFIX) if name.startswith(JOBS_PREFIX) else None


def dlq_topic(kafka: KafkaSettings, name: str) -> str:
    """The DLQ topic of destination `name`, or of job queue `jobs.<queue>`."""
    topics = Topics(kafka.topic_prefix)
    queue = job_queue(name)
    return topics.destination(name).dlq if queue is None else topics.queue(queue).dlq


@dataclass(frozen=True)
class DlqSummary:
    """One DLQ topic on the broker and how many records it holds."""

    name: str  # how commands name it: the destination, or `jobs.<queue>`
    kind: str  # "destination" or "jobs"
    topic: str
    records: int


def dlq_overview(kafka: KafkaSettings, timeout: float = 10.0) -> list[DlqSummary]:
    """Every destination and job-queue DLQ on the broker, with its record count."""
    topics = Topics(kafka.topic_prefix)
    dest_head, jobs_head = f"{topics.prefix}.dest.", f"{topics.prefix}.jobs."
    consumer = Consumer(kafka.client_config() | {"group.id": f"sluice-reader-{uuid.uuid4().hex}"})
    try:
        try:
            meta = consumer.list_topics(timeout=timeout)
        except Exception as exc:
            raise DlqError(f"cannot list the broker's topics: {exc}") from exc
        found = []
        for topic, info in sorted(meta.topics.items()):
            if not topic.endswith(".dlq") or info.error is not None:
                continue
            middle = topic.removesuffix(".dlq")
            if middle.startswith(dest_head) and "." not in middle[len(dest_head) :]:
                name, kind = middle[len(dest_head) :], "destination"
            elif middle.startswith(jobs_head) and "." not in middle[len(jobs_head) :]:
                name, kind = JOBS_PREFIX + middle[len(jobs_head) :], "jobs"
            else:
                continue
            count = 0
            for p in info.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout
                )
                count += max(0, high - low)
            found.append(DlqSummary(name, kind, topic, count))
        return sorted(found, key=lambda s: (s.kind != "destination", s.name))
    finally:
        consumer.close()


def dead_letters(
    kafka: KafkaSettings, destination: str, flt: DlqFilter | None = None
) -> list[DeadLetter]:
    """The records of a DLQ (a destination's, or `jobs.<queue>`) that match `flt`, oldest
    first per partition."""
    topic = dlq_topic(kafka, destination)
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
