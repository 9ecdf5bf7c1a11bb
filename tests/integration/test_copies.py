"""Copies of an event in the warehouse: one row for each event in every table, read plainly."""

from __future__ import annotations

import asyncio
import urllib.error
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ops.traffic import basic_auth
from tests.pipeline import Pipeline, http_text, pipeline_with_topics, until

pytestmark = pytest.mark.integration


def _order(message_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "u-copies",
        "messageId": message_id,
        "properties": {"total": 42.5},
    }


async def _post(pipe: Pipeline, message: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{pipe.gateway_url}/v1/track",
            json=message,
            headers={"Authorization": basic_auth(pipe.write_key)},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


def _counts(pipe: Pipeline, message_id: str) -> list[int]:
    """Rows of the event in `events`, `tracks` and its own table, read without FINAL."""
    try:
        return [
            pipe.query(f"SELECT count() FROM {table} WHERE {column} = '{message_id}'")[0][0]
            for table, column in (
                ("events", "event_id"),
                ("tracks", "id"),
                ("order_completed", "id"),
            )
        ]
    except urllib.error.HTTPError:  # the tables are not there yet
        return []


def _deduplicated(pipe: Pipeline) -> float:
    text = http_text(f"http://127.0.0.1:{pipe.query_port}/metrics")
    for line in text.splitlines():
        if line.startswith("sluice_sink_deduplicated_records_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_an_event_sent_again_is_one_row_in_every_table_also_after_a_sink_restart(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = pipeline_with_topics(tmp_path, broker, prefix)
    await asyncio.to_thread(pipe.start)
    try:
        # A client sends an event, does not see the answer, and sends it again.
        await _post(pipe, _order("m-again"))
        await until(lambda: _counts(pipe, "m-again") == [1, 1, 1], 60, "the first copy loaded")
        await asyncio.sleep(2)
        await _post(pipe, _order("m-again"))
        await _post(pipe, _order("m-after"))
        await until(lambda: _counts(pipe, "m-after") == [1, 1, 1], 60, "a later event loaded")
        assert _counts(pipe, "m-again") == [1, 1, 1]
        assert await asyncio.to_thread(_deduplicated, pipe) == 1

        # A restarted sink reads the window from the warehouse: a copy is still dropped.
        await asyncio.to_thread(pipe.stop, "sink")
        await asyncio.to_thread(pipe.start, "sink")
        await _post(pipe, _order("m-again"))
        await _post(pipe, _order("m-after"))
        await _post(pipe, _order("m-last"))
        await until(lambda: _counts(pipe, "m-last") == [1, 1, 1], 60, "the last event loaded")
        assert _counts(pipe, "m-again") == [1, 1, 1]
        assert _counts(pipe, "m-after") == [1, 1, 1]
        assert await asyncio.to_thread(_deduplicated, pipe) == 2
    finally:
        await asyncio.to_thread(pipe.stop)
