"""Live config: applied while two workers run under load, a new write key and a new
destination work within 5 s without restarts, nothing already flowing is lost or
duplicated; an invalid config is refused and never reaches a service."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

from core.settings import KafkaSettings
from ops.cli import app
from ops.services import Service
from ops.traffic import basic_auth, sample_events, send_batches
from tests.conftest import scaled
from tests.pipeline import Pipeline, free_port

pytestmark = pytest.mark.integration

GROWN = """
sources:
  - id: test-src
    write_keys: [{key}]
  - id: late-src
    write_keys: [late-key]
destinations:
  - id: warehouse
    type: clickhouse
    sources: [test-src, late-src]
    retry: {tiers: [1s, 3s], max_attempts: 3}
  - id: audit
    type: clickhouse
    sources: [test-src, late-src]
    settings: {table: audit_events, layout: false}
"""


async def _post_until_accepted(pipe: Pipeline, key: str, deadline_s: float) -> str:
    """POST one event with `key` until it is accepted; its messageId."""
    import aiohttp  # noqa: PLC0415

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < deadline_s:
            message_id = f"late-{time.monotonic_ns()}"
            body = {
                "batch": [
                    {"type": "track", "event": "Late", "userId": "u", "messageId": message_id}
                ]
            }
            async with session.post(
                f"{pipe.gateway_url}/v1/batch",
                json=body,
                headers={"Authorization": basic_auth(key)},
            ) as resp:
                if resp.status == 200:
                    return message_id
                assert resp.status == 401
            await asyncio.sleep(0.2)
    raise AssertionError(f"{key} not accepted within {deadline_s}s")


def _first_record_time(kafka: KafkaSettings, topic: str, timeout: float) -> float:
    """The producer timestamp (s) of the earliest record on `topic`, waiting up to `timeout`."""
    consumer = Consumer(kafka.client_config() | {"group.id": f"{topic}-probe"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        first: float | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None:
                    ts = msg.timestamp()[1] / 1000
                    first = ts if first is None else min(first, ts)
            if first is not None:
                # Every partition's head has been fetched by now: the earliest is known.
                deadline = min(deadline, time.monotonic() + 1)
        assert first is not None, f"nothing reached {topic} within {timeout}s"
        return first
    finally:
        consumer.close()


async def test_config_applied_under_load_takes_effect_within_five_seconds(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = Service("worker-2", pipeline.root / "run")
    pipeline.start()
    second.start(
        ["worker"],
        {
            **pipeline.env,
            "SLUICE_WORKER_METRICS_PORT": str(free_port()),
            "SLUICE_WORKER_DATA_DIR": str(pipeline.root / "worker-2"),
        },
    )
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", pipeline.bootstrap)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", pipeline.prefix)
    kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    events = sample_events(scaled(4000), users=100, seed=1)
    sent_at: dict[str, float] = {}
    accepted = 0
    stop_load = asyncio.Event()

    async def load() -> None:
        # About 400 events a second, 20 a request, for as long as the test runs.
        nonlocal accepted
        for i in range(0, len(events), 20):
            if stop_load.is_set():
                return
            part = events[i : i + 20]
            report = await send_batches(pipeline.gateway_url, pipeline.write_key, part, 20)
            assert report.accepted == len(part), report
            accepted += report.accepted
            now = time.time()
            sent_at.update((e["messageId"], now) for e in part)
            await asyncio.sleep(0.05)

    try:
        loader = asyncio.create_task(load())
        await asyncio.sleep(4)

        bad = tmp_path / "bad.yaml"
        bad.write_text(
            GROWN.replace("{key}", pipeline.write_key).replace(
                "id: audit\n    type: clickhouse", "id: audit\n    type: kafka"
            )
        )
        refused = await asyncio.to_thread(CliRunner().invoke, app, ["config", "apply", str(bad)])
        assert refused.exit_code == 1
        assert "destinations.1.type" in refused.output

        grown = tmp_path / "grown.yaml"
        grown.write_text(GROWN.replace("{key}", pipeline.write_key))
        applied_at = time.time()
        applied = await asyncio.to_thread(CliRunner().invoke, app, ["config", "apply", str(grown)])
        assert applied.exit_code == 0, applied.output
        late_id = await _post_until_accepted(pipeline, "late-key", 5.0)
        assert time.time() - applied_at <= 5.0

        # The new destination's first record was written within 5 s of the apply.
        first = await asyncio.to_thread(
            _first_record_time, kafka, f"{pipeline.prefix}.dest.audit", 30
        )
        assert first - applied_at <= 5.0, f"audit started {first - applied_at:.1f}s after apply"

        await asyncio.sleep(4)
        stop_load.set()
        await loader
    finally:
        stop_load.set()

    try:
        expected = accepted + 1  # the load and the late source's event
        assert await asyncio.to_thread(pipeline.wait_rows, expected, 180) >= expected
        # Nothing already flowing was lost or duplicated (one row an event_id, read FINAL).
        sent = {*sent_at, late_id}
        assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events FINAL") == [
            [expected, expected]
        ]
        assert {r[0] for r in pipeline.query("SELECT event_id FROM events FINAL")} == sent
        # Everything sent 5 s after the apply (both workers follow the config by then)
        # reached the new destination too.
        due = {m for m, t in sent_at.items() if t >= applied_at + 5.0} | {late_id}
        assert len(due) > 100
        deadline = time.monotonic() + 60
        audit: set[str] = set()
        while time.monotonic() < deadline and not due <= audit:
            audit = {r[0] for r in pipeline.query("SELECT event_id FROM audit_events")}
            await asyncio.sleep(0.5)
        assert due <= audit, f"{len(due - audit)} events missing from the new destination"
        assert audit <= sent
    finally:
        second.stop(timeout=60)
