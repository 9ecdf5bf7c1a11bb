"""The sink as a real process on the real broker: crashes and replays never duplicate rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from gateway.envelope import build_event, partition_key
from ops.traffic import sample_events
from schemas.codec import event_codec
from tests.conftest import scaled
from tests.pipeline import Pipeline, Usurper, http_json, http_text

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
    from core.settings import KafkaSettings  # noqa: PLC0415
    from ops.dlq import dead_letters  # noqa: PLC0415

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


def _ready(pipe: Pipeline) -> tuple[int, dict[str, Any]]:
    """The sink's `/ready`: status code and body."""
    try:
        return 200, http_json(f"http://127.0.0.1:{pipe.query_port}/ready", timeout=5)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_records_the_warehouse_refuses_go_to_the_dlq_and_the_rest_loads_once(
    pipeline: Pipeline,
) -> None:
    """Records on the topic that no table can take: dead-lettered with the engine's reason.

    Written by something other than the gateway (which refuses such numbers): a property
    in the unsigned 64-bit range where the column is `Int64` (the client cannot encode
    it), and properties that are not JSON (no layout table can take them). Each sits in a
    batch of good events; the batch is halved until they are found.
    """
    from core.settings import KafkaSettings  # noqa: PLC0415
    from ops.dlq import dead_letters  # noqa: PLC0415

    topic = f"{pipeline.prefix}.dest.warehouse"
    codec = event_codec()
    producer = Producer({"bootstrap.servers": pipeline.bootstrap, "enable.idempotence": True})
    received = int(time.time() * 1000)
    good: list[str] = []
    bad: dict[str, bytes] = {}
    for i, sample in enumerate(sample_events(400, seed=11)):
        msg = sample
        if i % 50 == 7:
            msg = {**msg, "type": "track", "event": "Big Number", "properties": {"n": i}}
        event = build_event(msg, "test-src", received)
        if i in (57, 257):
            event["properties"] = '{"n": 9223372036854775813}'  # above Int64's maximum
        elif i == 157:
            event["properties"] = '{"n": 1, "broken'  # not JSON
        value = codec.encode(event)
        if i in (57, 157, 257):
            bad[event["event_id"]] = value
        else:
            good.append(event["event_id"])
        producer.produce(topic, value, partition_key(event))
    assert producer.flush(30) == 0
    pipeline.start("sink")

    assert pipeline.wait_rows(len(good)) == len(good)
    kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    _wait(lambda: len(dead_letters(kafka, "warehouse")) >= len(bad), 60)
    letters = dead_letters(kafka, "warehouse")
    assert sorted(r.value for r in letters) == sorted(bad.values())
    reasons = sorted(r.headers["sluice.error.message"] for r in letters)
    for rec in letters:
        assert rec.headers["sluice.stage"] == "sink"
        assert rec.headers["sluice.error.class"] == "WarehouseRefused"
        assert rec.headers["sluice.destination"] == "warehouse"
        assert rec.headers["sluice.original.topic"] == topic
        assert rec.headers["sluice.original.offset"].isdigit()
    assert sum("JSONDecodeError" in r for r in reasons) == 1, reasons
    assert sum("big_number" in r and "`n`" in r for r in reasons) == 2, reasons

    assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events") == [
        [len(good), len(good)]
    ]
    ids = ", ".join(f"'{e}'" for e in bad)
    assert pipeline.query(f"SELECT count() FROM events WHERE event_id IN ({ids})") == [[0]]
    assert pipeline.query("SELECT count(), sum(n) FROM big_number") == [
        [5, 7 + 107 + 207 + 307 + 357]
    ]
    assert _lag(pipeline, topic) == 0
    assert _ready(pipeline) == (200, {"status": "ready"})


def test_a_sink_whose_loop_dies_exits_with_status_1_and_says_why(pipeline: Pipeline) -> None:
    """Another consumer joins with the sink's static instance id: the broker fences the sink.

    A fenced consumer can never commit again; the sink must not live on behind a green
    /health. Its loop ends, and the process exits with status 1 after logging why.
    """
    topic = f"{pipeline.prefix}.dest.warehouse"
    _produce(pipeline, 200)
    log_file = pipeline.root / "sink-fenced.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "sink"],
            env={**os.environ, **pipeline.env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def loaded() -> bool:
            try:
                return _count(pipeline) == 200
            except OSError:  # not listening yet
                assert proc.poll() is None, log_file.read_text()[-3000:]
                return False

        _wait(loaded, 120)
        group = pipeline.env["SLUICE_WAREHOUSE_CONSUMER_GROUP"]

        # Another member with the sink's instance id that, like a second sink, joins again
        # each time it is fenced: the sink rejoins a few times (a fencing can be spurious),
        # then gives up and exits with the reason.
        usurper = Usurper(pipeline.bootstrap, group, topic)
        try:
            deadline = time.monotonic() + 150
            while proc.poll() is None and time.monotonic() < deadline:
                usurper.poll(0.5)
        finally:
            usurper.close()
        assert proc.wait(timeout=30) == 1, log_file.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    output = log_file.read_text("utf-8", "replace")
    assert "fenced" in output, output[-3000:]
    assert "sink exits: its loop died" in output, output[-3000:]
    assert "joining the group again" in output, output[-3000:]
