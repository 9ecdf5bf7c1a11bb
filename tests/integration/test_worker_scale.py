"""Scale-out: workers in one consumer group share the ingest partitions; one dying loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ops.processes import BackgroundProcess
from ops.traffic import sample_events, send_batches
from tests.conftest import scaled
from tests.pipeline import Pipeline, free_port, worker_routed

pytestmark = pytest.mark.integration


async def test_two_workers_share_the_load_and_a_killed_one_loses_nothing(
    pipeline: Pipeline,
) -> None:
    count = scaled(6000)
    events = sample_events(count, users=200, seed=21)
    second_port = free_port()
    second = BackgroundProcess("worker-2", pipeline.root / "run")
    pipeline.start()
    second.start(
        ["worker"],
        {
            **pipeline.env,
            "SLUICE_WORKER_METRICS_PORT": str(second_port),
            "SLUICE_WORKER_DATA_DIR": str(pipeline.root / "worker-2"),
        },
    )
    try:
        sent = 0
        accepted = 0

        async def send(upto: int) -> None:
            nonlocal sent, accepted
            part = events[sent:upto]
            report = await send_batches(pipeline.gateway_url, pipeline.write_key, part, 50)
            accepted += report.accepted
            sent = upto

        # Send in small steps until both workers have routed events: they share partitions.
        deadline = time.monotonic() + 90
        while sent < count // 2 and time.monotonic() < deadline:
            await send(min(sent + 100, count // 2))
            if worker_routed(pipeline.worker_metrics_port) > 0 and worker_routed(second_port) > 0:
                break
            await asyncio.sleep(0.5)
        first_routed = worker_routed(pipeline.worker_metrics_port)
        second_routed = worker_routed(second_port)
        assert first_routed > 0, "the first worker routed nothing"
        assert second_routed > 0, "the second worker routed nothing"

        # SIGKILL one worker while events keep coming: the other takes its partitions over
        # (after the 10 s session timeout) and reads again what was not committed.
        killed = pipeline.pid("worker")
        await send(min(sent + 500, count))
        os.kill(killed, signal.SIGKILL)
        await send(count)

        assert accepted == count
        await asyncio.to_thread(pipeline.wait_rows, count, 180)
        # Events the killed worker routed but had not committed are routed again: the
        # warehouse keeps one row an event (ReplacingMergeTree by event_id, read FINAL).
        rows = pipeline.query("SELECT count(), uniqExact(event_id) FROM events FINAL")
        assert rows == [[count, count]]
        landed = {r[0] for r in pipeline.query("SELECT event_id FROM events FINAL")}
        assert landed == {e["messageId"] for e in events}
    finally:
        second.stop(timeout=60)
