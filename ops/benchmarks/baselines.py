"""The baselines each stage is measured against: the same work without Sluice around it.

A bare confluent-kafka producer for the gateway, a plain consume-route-produce loop for
the processor, a bare insert loop for the warehouse sink.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from core.kafka import idempotent_producer
from core.settings import KafkaSettings, TransformSettings
from ops.benchmarks.harness import BENCH_TRANSFORM_MODULES, per_second

if TYPE_CHECKING:
    from connectors.warehouse.clickhouse import Warehouse


def raw_producer_rate(
    kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes]]
) -> float:
    """Events/s of a bare confluent-kafka producer (idempotent, acks=all, linger 5 ms, lz4)."""
    producer = idempotent_producer(
        kafka,
        **{"linger.ms": 5, "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000},
    )
    started = time.perf_counter()
    for i, (key, value) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(120)
    return per_second(len(records), started)


def plain_loop_rate(
    kafka: KafkaSettings, source: str, config: str, count: int
) -> tuple[float, int]:
    """Events/s of a bare confluent-kafka loop doing the processor's work with its router,
    and how many records it wrote to the destination topic.

    Consume 1,000 at a time, route them (decode, filter, transform, encode) with the same
    `Router` the worker uses, produce, commit every second: the worker minus Faust. Its
    outputs go to topics of a prefix of their own.
    """
    from confluent_kafka import Consumer  # noqa: PLC0415

    from core.config import parse_config  # noqa: PLC0415
    from core.topics import Topics  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415
    from streams.processor import Incoming, Router  # noqa: PLC0415

    router = Router(
        parse_config(config),
        Topics(f"{kafka.topic_prefix}-plain"),
        event_codec(logical_types=False),
        TransformSettings(modules=(BENCH_TRANSFORM_MODULES,)),
    )
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"bench-plain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = idempotent_producer(kafka, **{"linger.ms": 5, "compression.type": "lz4"})
    consumer.subscribe([source])
    done = routed = 0
    started = 0.0
    last_commit = time.monotonic()
    while done < count:
        msgs = consumer.consume(1000, timeout=1.0)
        if msgs and not started:
            started = time.perf_counter()
        batch = [
            Incoming(m.key(), m.value() or b"", source, m.partition() or 0, m.offset() or 0, 0)
            for m in msgs
            if m.error() is None
        ]
        for topic, records in router.route(batch).outputs.items():
            producer.produce_batch(topic, [{"key": k, "value": v} for k, v, _ in records])
            if topic.endswith(".dest.warehouse"):
                routed += len(records)
        done += len(batch)
        producer.poll(0)
        if time.monotonic() - last_commit > 1.0:
            producer.flush()
            consumer.commit(asynchronous=False)
            last_commit = time.monotonic()
    producer.flush()
    rate = per_second(count, started)
    consumer.close()
    return rate, routed


def bare_insert_rate(warehouse: Warehouse, columns: list[list[Any]], rows: int) -> float:
    """Rows/s of a bare clickhouse-connect insert loop, 10,000 rows an insert, into `bare`."""
    from connectors.warehouse.clickhouse import COLUMN_NAMES, EVENT_COLUMNS, table_ddl  # noqa: PLC0415

    warehouse.command(table_ddl("bare", list(EVENT_COLUMNS), "tuple()", replacing=False))
    started = time.perf_counter()
    for i in range(0, rows, 10_000):
        warehouse.insert("bare", COLUMN_NAMES, [c[i : i + 10_000] for c in columns], f"bare-{i}")
    return per_second(rows, started)
