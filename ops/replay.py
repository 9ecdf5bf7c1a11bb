"""Replay: deliver an offset or time range of a topic through a destination again.

The records of the range are produced onto the destination's topic
(`sluice.dest.<d>`), each with `sluice.replay.of` (`topic:partition:offset` of the
record it copies) and `sluice.replay.id` (one id per replay run). From the
destination's own topic they are copied as they are; from the ingest topic (or any
topic of envelopes) they go through the destination's filter and transform first, as
the processor would route them. Idempotent sinks make a replay safe: the warehouse
sink skips copies of offsets it has loaded already, and webhook receivers see the
same `messageId` again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from core.config import PipelineConfig
from core.headers import REPLAY_OF
from core.kafka import Headers, idempotent_producer
from core.settings import KafkaSettings, TransformSettings
from core.topics import Topics
from ops.errors import ReplayError

REPLAY_ID = "sluice.replay.id"


@dataclass(frozen=True)
class ReplayRange:
    """Which records: offsets `from_offset..to_offset` (inclusive) and/or a time range (ms)."""

    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    partitions: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if (self.from_offset, self.to_offset, self.since_ms, self.until_ms) == (None,) * 4:
            raise ReplayError("say which records: an offset range, a time range, or both")


@dataclass
class ReplayReport:
    """What a replay did."""

    id: str
    read: int = 0
    produced: int = 0
    # Records the destination's filter or transform kept back (replays from the ingest topic).
    not_routed: int = 0
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)


def plan_ranges(
    consumer: Consumer, topic: str, rng: ReplayRange, timeout: float = 10.0
) -> dict[int, tuple[int, int]]:
    """Per partition, the offsets [start, end) the range covers now."""
    meta = consumer.list_topics(topic, timeout=timeout)
    if topic not in meta.topics or meta.topics[topic].error is not None:
        raise ReplayError(f"topic {topic} does not exist")
    partitions = sorted(meta.topics[topic].partitions)
    unknown = sorted(rng.partitions - set(partitions))
    if unknown:
        raise ReplayError(f"topic {topic} has no partitions {unknown}")
    chosen = [p for p in partitions if not rng.partitions or p in rng.partitions]
    out: dict[int, tuple[int, int]] = {}
    for p in chosen:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        start, end = low, high
        if rng.from_offset is not None:
            start = max(start, rng.from_offset)
        if rng.to_offset is not None:
            end = min(end, rng.to_offset + 1)
        if rng.since_ms is not None:
            start = max(start, _offset_at(consumer, topic, p, rng.since_ms, high, timeout))
        if rng.until_ms is not None:
            end = min(end, _offset_at(consumer, topic, p, rng.until_ms + 1, high, timeout))
        if end > start:
            out[p] = (start, end)
    return out


def _offset_at(
    consumer: Consumer, topic: str, partition: int, ms: int, high: int, timeout: float
) -> int:
    """The first offset with a timestamp at or after `ms` (the end of the log when none)."""
    (found,) = consumer.offsets_for_times([TopicPartition(topic, partition, ms)], timeout=timeout)
    return int(found.offset) if found.offset >= 0 else high


def read_ranges(
    consumer: Consumer, topic: str, ranges: dict[int, tuple[int, int]], timeout: float = 10.0
) -> Iterator[Message]:
    """The records of `ranges`, partition by partition interleaved as Kafka returns them."""
    if not ranges:
        return
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in ranges.items()])
    open_parts = set(ranges)
    deadline = time.monotonic() + timeout
    while open_parts:
        msgs = consumer.consume(500, 0.5)
        if not msgs and time.monotonic() > deadline:
            raise ReplayError(f"reading {topic} timed out")
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise ReplayError(f"reading {topic}: {err.str()}")
                continue
            deadline = time.monotonic() + timeout
            p, offset = msg.partition() or 0, msg.offset() or 0
            if p not in open_parts:
                continue
            end = ranges[p][1]
            if offset < end:
                yield msg
            if offset >= end - 1:
                open_parts.discard(p)
                consumer.pause([TopicPartition(topic, p)])


def run_replay(
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    destination: str,
    rng: ReplayRange,
    source: str | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    transforms: TransformSettings | None = None,
) -> ReplayReport:
    """Produce the range of `source` (default: the destination's topic) onto the destination.

    `transforms`: where the destination's transform may be imported from (None: nowhere).
    """
    dest = cfg.destination(destination)
    topics = Topics(kafka.topic_prefix)
    target = topics.destination(dest.id).main
    source = source or target
    route = None if source == target else _router(cfg, dest.id, kafka, transforms)
    report = ReplayReport(id=str(uuid.uuid4()))
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"sluice-replay-{report.id}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    producer = idempotent_producer(kafka)
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err.str())

    try:
        report.ranges = plan_ranges(consumer, source, rng)
        total = sum(end - start for start, end in report.ranges.values())
        started = time.monotonic()
        for msg in read_ranges(consumer, source, report.ranges):
            report.read += 1
            copies = [(msg.key(), msg.value() or b"")] if route is None else route(msg)
            report.not_routed += not copies
            for key, value in copies:
                if rate:
                    wait = started + report.produced / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                if not dry_run:
                    headers: Headers = [
                        *(msg.headers() or []),
                        (REPLAY_OF, f"{source}:{msg.partition()}:{msg.offset()}".encode()),
                        (REPLAY_ID, report.id.encode()),
                    ]
                    producer.produce(target, value, key, headers=headers, on_delivery=delivered)
                    producer.poll(0)
                report.produced += 1
            if on_progress:
                on_progress(report.read, total)
        if producer.flush(60) or failures:
            raise ReplayError(
                f"replayed records not confirmed by Kafka: {failures[:1] or 'timeout'}"
            )
    finally:
        consumer.close()
    return report


def _router(
    cfg: PipelineConfig,
    destination: str,
    kafka: KafkaSettings,
    transforms: TransformSettings | None,
) -> Callable[[Message], list[tuple[bytes | None, bytes]]]:
    """Route envelopes as the processor would, to this one destination only."""
    from schemas.codec import event_codec  # noqa: PLC0415
    from streams.processor import Incoming, Router  # noqa: PLC0415

    only = PipelineConfig(
        sources=cfg.sources,
        destinations=tuple(d for d in cfg.destinations if d.id == destination),
    )
    topics = Topics(kafka.topic_prefix)
    allowed = transforms if transforms is not None else TransformSettings(modules=())
    router = Router(only, topics, event_codec(logical_types=False), allowed)
    target = topics.destination(destination).main

    def route(msg: Message) -> list[tuple[bytes | None, bytes]]:
        incoming = Incoming(
            msg.key(),
            msg.value() or b"",
            msg.topic() or "",
            msg.partition() or 0,
            msg.offset() or 0,
            msg.timestamp()[1],
        )
        routed = router.route([incoming], final=True)
        return [(key, value) for key, value, _ in routed.outputs.get(target, []) if value]

    return route
