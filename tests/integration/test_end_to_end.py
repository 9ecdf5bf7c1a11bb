"""End to end over real HTTP: gateway -> Kafka -> Faust worker -> Kafka -> ClickHouse sink."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import pytest

from ops.traffic import sample_events, send_batches
from tests.conftest import scaled
from tests.pipeline import Pipeline, http_text

pytestmark = pytest.mark.integration


def _ms(value: str) -> int:
    return int(datetime.fromisoformat(value).timestamp() * 1000)


async def test_batches_land_once_with_their_fields(pipeline: Pipeline) -> None:
    count = scaled(1000)
    pipeline.start()
    events = sample_events(count, seed=7)

    report = await send_batches(pipeline.gateway_url, pipeline.write_key, events, batch_size=100)

    assert report.accepted == count
    assert set(report.statuses) == {200}
    assert await asyncio.to_thread(pipeline.wait_rows, count) == count
    rows = pipeline.query("SELECT count(), uniqExact(event_id) FROM events")
    assert rows == [[count, count]]
    metrics = http_text(f"http://127.0.0.1:{pipeline.worker_metrics_port}/metrics")
    assert (
        f'sluice_processor_events_total{{destination="warehouse",outcome="routed"}} {float(count)}'
        in metrics
    )
    # Everything is processed: each ingest partition the worker read reports no lag.
    lags = [
        line for line in metrics.splitlines() if line.startswith("sluice_processor_consumer_lag{")
    ]
    assert lags
    assert all(line.endswith(" 0.0") and ".events.ingest" in line for line in lags), lags
    landed = {
        r[0]: r[1:]
        for r in pipeline.query(
            "SELECT event_id, source_id, type, event, user_id, properties, traits, "
            "timestamp, received_at, sent_at, original_timestamp FROM events"
        )
    }
    assert set(landed) == {e["messageId"] for e in events}
    for sent in events:
        source, etype, name, user, props, traits, ts, received, sent_at, original = landed[
            sent["messageId"]
        ]
        assert (source, etype, user) == ("test-src", sent["type"], sent["userId"])
        assert name == sent.get("event", sent.get("name"))
        assert json.loads(props) == sent.get("properties", {})
        assert json.loads(traits) == sent.get("traits", {})
        assert _ms(original) == _ms(sent["timestamp"])
        # Clock skew corrected as SDK pipelines do: receivedAt - (sentAt - originalTimestamp).
        assert _ms(ts) == _ms(received) - (_ms(sent_at) - _ms(original))


async def test_worker_stopped_mid_stream_loses_and_duplicates_nothing(pipeline: Pipeline) -> None:
    count = scaled(3000)
    pipeline.start()
    events = sample_events(count, seed=11)
    thirds = [events[: count // 3], events[count // 3 : 2 * count // 3], events[2 * count // 3 :]]

    async def send(part: list[dict[str, object]]) -> int:
        report = await send_batches(pipeline.gateway_url, pipeline.write_key, part, batch_size=20)
        return report.accepted

    accepted = await send(thirds[0])
    old_pid = pipeline.pid("worker")
    # SIGTERM while the stream goes on: the second third is sent during the shutdown.
    stopping = asyncio.create_task(asyncio.to_thread(pipeline.stop, "worker"))
    accepted += await send(thirds[1])
    await stopping
    in_warehouse_while_stopped = pipeline.query("SELECT count() FROM events")[0][0]
    await asyncio.to_thread(pipeline.start, "worker")
    assert pipeline.pid("worker") != old_pid
    accepted += await send(thirds[2])

    assert in_warehouse_while_stopped < count
    assert accepted == count
    assert await asyncio.to_thread(pipeline.wait_rows, count) == count
    assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events") == [[count, count]]
