"""Table and column limits in the sink process: the overflow in `discards` and counted."""

from __future__ import annotations

import asyncio
import re
import urllib.error
from pathlib import Path

import pytest

from connectors.warehouse.layout import event_table
from core.settings import KafkaSettings
from core.topics import Topics
from tests.pipeline import envelope_records, http_text, pipeline_with_topics, produce, until

pytestmark = pytest.mark.integration


def _overflow(text: str, limit: str) -> float:
    found = re.search(rf'sluice_sink_overflow_total\{{[^}}]*limit="{limit}"[^}}]*\}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


async def test_the_sink_keeps_a_source_within_its_limits_and_counts_the_overflow(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = pipeline_with_topics(tmp_path, broker, prefix)
    pipe.env["SLUICE_WAREHOUSE_MAX_EVENT_TABLES"] = "3"
    pipe.env["SLUICE_WAREHOUSE_MAX_COLUMNS"] = "40"
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topic = Topics(prefix).destination("warehouse").main
    names = ["Заказ", "注文", *[f"Name {i}" for i in range(8)], "events"]
    wide = {f"p{i:03d}": i for i in range(100)}
    messages = [
        {
            "type": "track",
            "event": name,
            "messageId": f"m{i}",
            "userId": "u1",
            "properties": wide if name == "Name 0" else {"n": i},
        }
        for i, name in enumerate(names)
    ]
    await asyncio.to_thread(pipe.start, "sink")
    try:
        await asyncio.to_thread(produce, kafka, topic, envelope_records(messages))

        def all_loaded() -> bool:
            # The raw table is written after the layout tables: wait for both.
            try:
                return all(
                    pipe.query(f"SELECT count() FROM {table}") == [[len(names)]]
                    for table in ("tracks", "events")
                )
            except urllib.error.HTTPError:  # no `tracks` yet
                return False

        await until(all_loaded, within=120, what="every event in tracks and events")
        tables = {
            r[0]
            for r in pipe.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        }
        admitted = {event_table(n) for n in names[:3]}
        assert tables & {event_table(n) for n in names} == admitted
        assert len(pipe.query(f"DESCRIBE TABLE {event_table('Name 0')}")) == 40
        reasons = dict(pipe.query("SELECT reason, count() FROM discards GROUP BY reason"))
        by_limit = {
            limit: sum(n for r, n in reasons.items() if f"SLUICE_WAREHOUSE_MAX_{limit}" in r)
            for limit in ("EVENT_TABLES", "COLUMNS")
        }
        assert sum(reasons.values()) == sum(by_limit.values())
        assert by_limit["EVENT_TABLES"] == len(names) - 3
        assert 0 < by_limit["COLUMNS"] < 100
        metrics = await asyncio.to_thread(http_text, f"http://127.0.0.1:{pipe.query_port}/metrics")
        assert _overflow(metrics, "event_tables") == len(names) - 3
        assert _overflow(metrics, "columns") == by_limit["COLUMNS"]
    finally:
        await asyncio.to_thread(pipe.stop)
