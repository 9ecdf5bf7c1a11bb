"""What every benchmark shares: its topics and input, timing, and the report of a run.

Each stage runs next to a baseline measured in the same run on the same machine, so the
report is the pair (and their ratio), not an absolute number from elsewhere.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from core.kafka import idempotent_producer
from core.settings import KafkaSettings
from ops.output import fail

Bootstrap = Annotated[str | None, typer.Option(help="Kafka bootstrap servers.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the results here.")]

console = Console()

BENCH_CONFIG = """
sources:
  - id: bench
    write_keys: [bench-key]
destinations:
  - id: warehouse
    type: clickhouse
    sources: [bench]
"""

# Where the benchmark's transform lives: the only modules its routers may import from.
BENCH_TRANSFORM_MODULES = "ops.benchmarks"


def bench_topics(bootstrap: str) -> tuple[KafkaSettings, Any]:
    """Settings with a topic prefix of this run's own, and the topics of BENCH_CONFIG created."""
    from core.admin import apply_topics  # noqa: PLC0415
    from core.config import parse_config  # noqa: PLC0415
    from core.topics import required_topics  # noqa: PLC0415

    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    cfg = parse_config(BENCH_CONFIG)
    apply_topics(required_topics(cfg, kafka), kafka)
    return kafka, cfg


def envelopes(count: int) -> list[tuple[bytes, bytes]]:
    """`count` sample events as the gateway writes them: (partition key, Avro envelope)."""
    from gateway.envelope import build_event, partition_key  # noqa: PLC0415
    from ops.traffic import sample_events  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415

    codec, now = event_codec(), int(time.time() * 1000)
    out = []
    for msg in sample_events(count, users=500, seed=1):
        event = build_event(msg, "bench", now)
        out.append((partition_key(event), codec.encode(event)))
    return out


def seed_topic(kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Produce the benchmark's input, with a progress bar; waits for the broker's confirmations."""
    producer = idempotent_producer(kafka, **{"linger.ms": 20, "compression.type": "lz4"})
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"producing to {topic}", total=len(records))
        for i, (key, value) in enumerate(records):
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.05)
            if i % 10_000 == 0:
                producer.poll(0)
                progress.update(task, completed=i)
        if producer.flush(120):
            fail(f"{topic}: the broker did not confirm every input record")
        progress.update(task, completed=len(records))


def end_offsets(kafka: KafkaSettings, topic: str) -> int:
    """The sum of `topic`'s end offsets: how many records it holds (none were deleted)."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer(kafka.client_config() | {"group.id": "sluice-bench-watermarks"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.topics[topic].partitions
        )
    finally:
        consumer.close()


def committed_total(kafka: KafkaSettings, group: str, topic: str) -> int:
    """The sum of `group`'s committed offsets on `topic`: the input it has finished."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer(kafka.client_config() | {"group.id": group})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p) for p in meta.topics[topic].partitions]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


def per_second(count: int, started: float) -> float:
    """`count` over the seconds since `started` (a `time.perf_counter()` reading)."""
    return count / (time.perf_counter() - started)


def report(
    table: Table,
    results: dict[str, Any],
    json_out: Path | None,
    ratio: tuple[str, float] | None = None,
) -> None:
    """Print the table (and the stage's ratio to its baseline); write the results as JSON."""
    console.print(table)
    if ratio is not None:
        label, value = ratio
        console.print(f"{label}: {value:.2f}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of an ascending, non-empty list."""
    import math  # noqa: PLC0415

    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
