"""The sink app in this process on the real broker and the real engine: outages and a dead loop.

Plus how insert errors are classified, on what the embedded engine, the client and an
HTTP server really raise.

The outage is ClickHouse's own: the raw table refuses inserts with TOO_MANY_PARTS (code 252)
while its merges are stopped and `parts_to_throw_insert` is 1, set through a second handle
on the same embedded engine, and heals when both are reset.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from aiohttp import web
from clickhouse_connect.driver.exceptions import ClickHouseError, ProgrammingError

from connectors.errors import DestinationUnavailable, WarehouseRefused
from connectors.warehouse.clickhouse import Warehouse, warehouse_error
from connectors.warehouse.process import METRICS, create_app
from core.admin import apply_topics
from core.config import PipelineConfig, parse_config
from core.settings import KafkaSettings, WarehouseSettings
from core.topics import required_topics
from ops.traffic import sample_events
from tests.pipeline import (
    CONFIG,
    Usurper,
    envelope_records,
    free_port,
    group_lag,
    http_json,
    produce,
    until,
)

pytestmark = pytest.mark.integration


def _config(kafka: KafkaSettings) -> PipelineConfig:
    cfg = parse_config(CONFIG.replace("{key}", "test-key"))
    apply_topics(required_topics(cfg, kafka), kafka)
    return cfg


def _settings(prefix: str, root: Path, **overrides: Any) -> WarehouseSettings:
    return WarehouseSettings(
        dsn=f"chdb://{root / 'warehouse'}",
        consumer_group=f"{prefix}-sink",
        batch_seconds=0.5,
        query_port=free_port(),
        **overrides,
    )


class Sink:
    """The sink's app served on a port of this process, and a second handle on its engine."""

    def __init__(self, app: web.Application, settings: WarehouseSettings) -> None:
        self.app = app
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.query_port}"
        self.engine: Any = None

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """`/ready` (from a thread: the app is served by this event loop)."""
        return await asyncio.to_thread(self.ready_now)

    def ready_now(self) -> tuple[int, dict[str, Any]]:
        """`/ready`, blocking: for checks that `until` runs in a thread."""
        try:
            return 200, http_json(f"{self.url}/ready", timeout=5)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def rows(self, sql: str) -> list[Any]:
        return [list(r) for r in self.engine.query(sql).result_rows]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.app[METRICS].registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@pytest.fixture
async def sink_app(
    broker: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Sink]:
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    settings = _settings(prefix, tmp_path, **getattr(request, "param", {}))
    app = create_app(settings, kafka, _config(kafka))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.query_port).start()
    sink = Sink(app, settings)
    # The sink opened the engine; this is one more handle on it (not a second engine).
    sink.engine = await asyncio.to_thread(
        clickhouse_connect.get_client, dsn=f"chdb://{tmp_path / 'warehouse'}"
    )
    try:
        yield sink
    finally:
        await runner.cleanup()
        sink.engine.close()


OUTAGE = {"session_timeout_ms": 6000, "max_poll_interval_ms": 7000, "stall_after_s": 3.0}


@pytest.mark.parametrize("sink_app", [OUTAGE], indirect=True)
async def test_an_outage_longer_than_max_poll_interval_stalls_ready_then_loads_all_once(
    sink_app: Sink, broker: str, prefix: str
) -> None:
    sink = sink_app
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topic = f"{prefix}.dest.warehouse"
    messages = sample_events(400, seed=21)
    produce(kafka, topic, envelope_records(messages[:100]))
    await until(lambda: sink.rows("SELECT count() FROM events") == [[100]], 60, "first rows")
    assert await sink.ready() == (200, {"status": "ready"})
    assigned = sink.metric("sluice_sink_partitions_total", {"event": "assigned"})

    # The outage: every insert into the raw table fails with TOO_MANY_PARTS.
    sink.engine.command("SYSTEM STOP MERGES events")
    sink.engine.command("ALTER TABLE events MODIFY SETTING parts_to_throw_insert = 1")
    began = time.monotonic()
    produce(kafka, topic, envelope_records(messages[100:]))

    def stalled() -> bool:
        status, body = sink.ready_now()
        return status == 503 and "stalled" in body.get("reason", "")

    await until(stalled, 60, "/ready 503 while stalled")
    status, body = await sink.ready()
    assert status == 503
    assert body["status"] == "not ready"
    assert "records waiting and no progress" in body["reason"]
    assert sink.metric("sluice_sink_seconds_since_progress") > OUTAGE["stall_after_s"]
    # The stall may be seen before the first failed insert is counted on a busy machine.
    await until(
        lambda: (
            sink.metric(
                "sluice_sink_errors_total",
                {"destination": "warehouse", "error": "DestinationUnavailable"},
            )
            > 0
        ),
        30,
        "the failed inserts counted",
    )
    # Three times the poll interval: a sink that stopped polling would have left its group.
    await asyncio.sleep(max(0.0, began + 3 * 7 - time.monotonic()))
    assert sink.rows("SELECT count() FROM events") == [[100]]

    sink.engine.command("ALTER TABLE events RESET SETTING parts_to_throw_insert")
    sink.engine.command("SYSTEM START MERGES events")
    await until(lambda: sink.rows("SELECT count() FROM events") == [[400]], 120, "all rows")
    await until(lambda: group_lag(kafka, f"{prefix}-sink", [topic]) == 0, 60, "lag 0")
    await asyncio.sleep(2)  # anything loaded twice would show by now
    assert sink.rows("SELECT count(), uniqExact(event_id) FROM events") == [[400, 400]]
    assert await sink.ready() == (200, {"status": "ready"})
    # The sink kept its group membership throughout: no partition was revoked or reassigned.
    assert sink.metric("sluice_sink_partitions_total", {"event": "revoked"}) == 0
    assert sink.metric("sluice_sink_partitions_total", {"event": "assigned"}) == assigned


async def test_a_dead_sink_loop_makes_ready_fail_with_the_reason(
    sink_app: Sink, broker: str, prefix: str
) -> None:
    sink = sink_app
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topic = f"{prefix}.dest.warehouse"
    produce(kafka, topic, envelope_records(sample_events(50, seed=22)))
    await until(lambda: sink.rows("SELECT count() FROM events") == [[50]], 60, "rows")
    assert await sink.ready() == (200, {"status": "ready"})

    # A second member with the sink's static instance id fences the sink, again each time
    # the sink joins again, until the sink gives up.
    usurper = Usurper(broker, sink.settings.consumer_group, topic)
    try:

        def dead() -> bool:
            usurper.poll(0.5)
            status, body = sink.ready_now()
            return status == 503 and "loop died" in body.get("reason", "")

        await until(dead, 150, "/ready 503 after the loop died")
    finally:
        usurper.close()
    status, body = await sink.ready()
    assert status == 503
    assert "fenced" in body["reason"]
    await asyncio.sleep(1)
    assert (await sink.ready())[0] == 503  # never ready again in this process


def test_engine_and_client_errors_are_told_apart_transient_or_refused(tmp_path: Path) -> None:
    """What the embedded engine and the client raise, classified (measured, not assumed)."""
    warehouse = Warehouse(WarehouseSettings(dsn=f"chdb://{tmp_path / 'wh'}"))
    try:
        warehouse.command("CREATE TABLE t (n Int64) ENGINE = MergeTree ORDER BY n")
        # The client cannot encode an integer above Int64 (DataError, no server code).
        with pytest.raises(WarehouseRefused, match="Unable to create native array"):
            warehouse.insert("t", ["n"], [[2**63]], "a")
        # An ALTER over max_query_size: SYNTAX_ERROR (62) from the engine.
        names = {f"c{'x' * 110}{i}": "Nullable(String)" for i in range(2500)}
        with pytest.raises(WarehouseRefused) as refused:
            warehouse.add_columns("t", names)
        assert refused.value.code == 62
        # Overload: TOO_MANY_PARTS (252) passes once merges run again.
        warehouse.insert("t", ["n"], [[1]], "b")
        warehouse.command("SYSTEM STOP MERGES t")
        warehouse.command("ALTER TABLE t MODIFY SETTING parts_to_throw_insert = 1")
        with pytest.raises(DestinationUnavailable, match="TOO_MANY_PARTS"):
            warehouse.insert("t", ["n"], [[2]], "c")
    finally:
        warehouse.close()


async def test_a_server_answering_503_is_a_transient_failure() -> None:
    """ClickHouse's HTTP interface under overload, as clickhouse-connect reports it."""

    async def overloaded(_request: web.Request) -> web.Response:
        return web.Response(
            status=503,
            text="Code: 202. DB::Exception: Too many simultaneous queries. "
            "(TOO_MANY_SIMULTANEOUS_QUERIES)",
            headers={"X-ClickHouse-Exception-Code": "202"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", overloaded)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with pytest.raises(ClickHouseError) as raised:
            await asyncio.to_thread(clickhouse_connect.get_client, host="127.0.0.1", port=port)
    finally:
        await runner.cleanup()
    error = warehouse_error(raised.value, "warehouse insert")
    assert isinstance(error, DestinationUnavailable)
    assert error.retriable
    refused = warehouse_error(ProgrammingError("Code: 62. DB::Exception: Syntax error"), "x")
    assert isinstance(refused, WarehouseRefused)
    assert not refused.retriable
