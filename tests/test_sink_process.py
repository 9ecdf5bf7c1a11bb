"""The sink as a real process on the real broker: crashes and replays never duplicate rows."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from gateway.envelope import build_event, partition_key
from ops.traffic import sample_events
from schemas.codec import event_codec
from tests.conftest import scaled
from tests.pipeline import Pipeline, http_text

pytestmark = pytest.mark.integration


def _produce(pipe: Pipeline, count: int) -> tuple[str, int]:
    """`count` routed events straight onto the destination topic; (topic, track events)."""
    topic = f"{pipe.prefix}.dest.warehouse"
    codec = event_codec()
    producer = Producer(
        {"bootstrap.servers": pipe.bootstrap, "linger.ms": 20, "enable.idempotence": True}
    )
    tracks = 0
    received = int(time.time() * 1000)
    for i, msg in enumerate(sample_events(count, seed=3)):
        event = build_event(msg, "test-src", received)
        tracks += event["type"] == "track"
        producer.produce(topic, codec.encode(event), partition_key(event))
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    return topic, tracks


def _count(pipe: Pipeline, table: str = "events") -> int:
    return int(pipe.query(f"SELECT count() FROM {table}")[0][0])


def _lag(pipe: Pipeline, topic: str) -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": pipe.bootstrap,
            "group.id": pipe.env["SLUICE_WAREHOUSE_CONSUMER_GROUP"],
        }
    )
    try:
        parts = [TopicPartition(topic, p) for p in range(4)]
        committed = consumer.committed(parts, timeout=10)
        return sum(
            consumer.get_watermark_offsets(tp, timeout=10)[1] - max(tp.offset, 0)
            for tp in committed
        )
    finally:
        consumer.close()


def _wait(predicate: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_sink_killed_three_times_then_replayed_loads_every_event_once(pipeline: Pipeline) -> None:
    count = scaled(100_000)
    topic, tracks = _produce(pipeline, count)
    pipeline.start("sink")
    for share in (0.15, 0.45, 0.75):
        _wait(lambda share=share: _count(pipeline) >= share * count)
        pid = pipeline.pid("sink")
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: pipeline.services["sink"].pid() is None, 30)
        pipeline.start("sink")

    assert pipeline.wait_rows(count, timeout=300) == count
    assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events") == [[count, count]]
    assert pipeline.query("SELECT count(), uniqExact(id) FROM tracks") == [[tracks, tracks]]

    # Replay the whole topic through the sink: a consumer group that starts at offset 0.
    pipeline.stop("sink")
    pipeline.env["SLUICE_WAREHOUSE_CONSUMER_GROUP"] += "-replay"
    assert _lag(pipeline, topic) == count
    pipeline.start("sink")
    _wait(lambda: _lag(pipeline, topic) == 0)

    assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events") == [[count, count]]
    assert pipeline.query("SELECT count(), uniqExact(id) FROM tracks") == [[tracks, tracks]]
    metrics = http_text(f"http://127.0.0.1:{pipeline.query_port}/metrics")
    assert (
        f'sluice_sink_deduplicated_records_total{{destination="warehouse"}} {float(count)}'
        in metrics
    )


def test_undecodable_records_go_to_the_dlq_and_the_rest_loads(pipeline: Pipeline) -> None:
    from ops.dlq import dead_letters  # noqa: PLC0415
    from ops.settings import KafkaSettings  # noqa: PLC0415

    topic = f"{pipeline.prefix}.dest.warehouse"
    codec = event_codec()
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    received = int(time.time() * 1000)
    poison = [b"not avro", b"\x00\x00\x00\x00\x01\x04", b"\x00\x00\x00\x03\x09{}"]
    for i, msg in enumerate(sample_events(50, seed=8)):
        event = build_event(msg, "test-src", received)
        producer.produce(topic, codec.encode(event), partition_key(event))
        if i % 20 == 0:
            producer.produce(topic, poison[i // 20], b"k")
    assert producer.flush(30) == 0
    pipeline.start("sink")

    assert pipeline.wait_rows(50) == 50
    kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    _wait(lambda: len(dead_letters(kafka, "warehouse")) == 3, 30)
    letters = dead_letters(kafka, "warehouse")
    assert sorted(r.value for r in letters) == sorted(poison)
    for rec in letters:
        assert rec.headers["sluice.stage"] == "sink"
        assert rec.headers["sluice.error.class"] == "SchemaError"
        assert rec.headers["sluice.original.topic"] == topic
        assert rec.headers["sluice.original.offset"].isdigit()
    assert _lag(pipeline, topic) == 0
