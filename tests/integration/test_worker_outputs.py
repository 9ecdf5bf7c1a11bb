"""The worker's outputs that Kafka refuses, and its readiness, through real worker processes.

An output Kafka refuses for good (over a topic's `max.message.bytes`, or over the
producer's `message.max.bytes`) sends its event to the destination's DLQ with the reason,
and everything else of the batch is confirmed once. A worker with input waiting that
completes no batch stops being ready once its stall limit passed, and is ready again once
it moves.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from core.settings import KafkaSettings
from core.topics import Topics
from ops.traffic import sample_events, send_batches
from schemas.codec import event_codec
from tests.configs import Configs
from tests.pipeline import (
    group_lag,
    http_text,
    pipeline_with_topics,
    probe,
    read_records,
    until,
)

CODEC = event_codec(logical_types=False)


def _set_topic_config(kafka: KafkaSettings, topic: str, name: str, value: str) -> None:
    admin = AdminClient(kafka.client_config())
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)],
    )
    admin.incremental_alter_configs([resource])[resource].result(30)


def _ids(kafka: KafkaSettings, topic: str) -> Counter[str]:
    return Counter(CODEC.decode(m.value())["event_id"] for m in read_records(kafka, topic))


def _metric(port: int, name: str, **labels: str) -> float:
    """A sample of the worker's metrics (0 when absent)."""
    text = http_text(f"http://127.0.0.1:{port}/metrics", timeout=5)
    for line in text.splitlines():
        match = re.match(rf"{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


@pytest.mark.integration
async def test_outputs_kafka_refuses_go_to_the_dlq_and_the_rest_of_the_batch_is_confirmed(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = pipeline_with_topics(
        tmp_path,
        broker,
        prefix,
        configs.text(
            configs.warehouse(),
            configs.warehouse("fat", transform={"function": "tests.transforms:inflate"}),
        ),
    )
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topics = Topics(prefix)
    warehouse, fat = topics.destination("warehouse"), topics.destination("fat")
    # The warehouse's topic takes records (and record batches) of at most 12,000 bytes.
    await asyncio.to_thread(_set_topic_config, kafka, warehouse.main, "max.message.bytes", "12000")
    events = sample_events(600, users=60, seed=17)
    tracks = [e for e in events if e["type"] == "track"]
    padded, inflated = tracks[5::120], tracks[11::130]
    for event in padded:
        # 16 KB that compression cannot shrink: over the warehouse topic's limit.
        event["properties"]["pad"] = base64.b64encode(os.urandom(12_000)).decode()
    for event in inflated:
        # The fat destination's transform makes these 2 MB: over the producer's limit.
        event["properties"]["inflate"] = True
    everything = {e["messageId"] for e in events}
    await asyncio.to_thread(pipe.start, "gateway", "worker")
    try:
        report = await send_batches(pipe.gateway_url, pipe.write_key, events, 50)
        assert report.accepted == len(events)
        await until(
            lambda: group_lag(kafka, f"{prefix}-processor", [topics.ingest]) == 0,
            180,
            "the worker committing every ingested event",
        )
        warehouse_ids = await asyncio.to_thread(_ids, kafka, warehouse.main)
        fat_ids = await asyncio.to_thread(_ids, kafka, fat.main)
        warehouse_dlq = await asyncio.to_thread(read_records, kafka, warehouse.dlq)
        fat_dlq = await asyncio.to_thread(read_records, kafka, fat.dlq)
        refused = _metric(
            pipe.worker_metrics_port,
            "sluice_processor_events_total",
            destination="warehouse",
            outcome="refused",
        )
        assert pipe.services["worker"].pid() is not None, "the worker stopped"
    finally:
        await asyncio.to_thread(pipe.stop)
    # Every other event was confirmed once, the refused ones are not on the topic.
    assert set(warehouse_ids) == everything - {e["messageId"] for e in padded}
    assert set(fat_ids) == everything - {e["messageId"] for e in inflated}
    assert max(warehouse_ids.values()) == 1
    assert max(fat_ids.values()) == 1
    # Each refused event is in its destination's DLQ once, as it came in, with the reason.
    for dlq, expected, destination in (
        (warehouse_dlq, padded, "warehouse"),
        (fat_dlq, inflated, "fat"),
    ):
        decoded = [CODEC.decode(m.value()) for m in dlq]
        assert sorted(e["event_id"] for e in decoded) == sorted(e["messageId"] for e in expected)
        assert all("blob" not in orjson.loads(e["properties"]) for e in decoded)
        for msg in dlq:
            headers = {k: (v or b"").decode() for k, v in msg.headers() or []}
            assert headers["sluice.error.class"] == "RecordRefused"
            assert "too large" in headers["sluice.reason"].lower()
            assert headers["sluice.stage"] == "produce"
            assert headers["sluice.destination"] == destination
            assert headers["sluice.original.topic"] == topics.ingest
            assert int(headers["sluice.original.offset"]) >= 0
    assert refused == len(padded)


@pytest.mark.integration
async def test_a_worker_that_makes_no_progress_is_not_ready_until_it_moves_again(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = pipeline_with_topics(
        tmp_path,
        broker,
        prefix,
        configs.text(
            configs.warehouse(transform={"function": "tests.transforms:stall", "timeout_s": 20})
        ),
    )
    pipe.env["SLUICE_WORKER_STALL_AFTER_S"] = "3"
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topics = Topics(prefix)
    port = pipe.worker_metrics_port
    events = sample_events(300, users=30, seed=23)
    stuck = next(e for e in events[150:] if e["type"] == "track")
    stuck["properties"]["stall"] = True  # its transform takes 8 s: no batch completes

    def drained() -> bool:
        return group_lag(kafka, f"{prefix}-processor", [topics.ingest]) == 0

    await asyncio.to_thread(pipe.start, "gateway", "worker")
    try:
        await until(lambda: probe(port)[0] == 200, 60, "the worker ready")
        report = await send_batches(pipe.gateway_url, pipe.write_key, events[:150], 50)
        assert report.accepted == 150
        await until(drained, 90, "the first events processed")
        assert probe(port)[0] == 200

        report = await send_batches(pipe.gateway_url, pipe.write_key, events[150:], 50)
        assert report.accepted == 150
        await until(lambda: probe(port)[0] == 503, 30, "the stalled worker not ready")
        status, body = probe(port)
        assert status == 503
        assert "processor stalled" in body["reason"]
        assert "records waiting" in body["reason"]
        assert _metric(port, "sluice_processor_seconds_since_progress") > 3
        assert probe(port, "/health")[0] == 200  # alive: busy, not dead

        # The batch completes: progress, ready again, every event through.
        await until(drained, 90, "the waiting events processed")
        await until(lambda: probe(port)[0] == 200, 30, "the worker ready again")
        assert _metric(port, "sluice_processor_seconds_since_progress") == 0
        assert pipe.services["worker"].pid() is not None
        landed = await asyncio.to_thread(_ids, kafka, topics.destination("warehouse").main)
    finally:
        await asyncio.to_thread(pipe.stop)
    assert set(landed) == {e["messageId"] for e in events}
