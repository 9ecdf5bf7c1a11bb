"""Job queues across a restart of the broker: no submitted job is lost, none runs twice."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from core.settings import BrokerSettings
from ops.kafka_broker import start_broker, stop_broker
from tests.configs import Configs
from tests.job_functions import read_ledger
from tests.jobs_api import all_in, queue_pipeline, status_of, submit
from tests.pipeline import free_port, until

pytestmark = pytest.mark.integration


async def test_a_broker_restart_loses_no_submitted_job(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    del broker  # the shared broker must be up too: this test starts one of its own beside it
    own = BrokerSettings(
        port=free_port(), controller_port=free_port(), state_dir=tmp_path / "kafka"
    )
    await asyncio.to_thread(start_broker, own)
    pipe = None
    try:
        pipe = queue_pipeline(configs, f"127.0.0.1:{own.port}", prefix, tmp_path, concurrency=10)
        ledger = str(tmp_path / "ledger.jsonl")
        await asyncio.to_thread(pipe.start, "gateway", "jobs")
        async with aiohttp.ClientSession() as session:
            now = [{"payload": {"ledger": ledger, "sleep": 0.05}} for _ in range(300)]
            later = [{"payload": {"ledger": ledger}, "delay_ms": 8000} for _ in range(50)]
            ids = await submit(session, pipe, now + later)

        def done() -> Counter[str]:
            return Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "done")

        await until(lambda: len(done()) > 50, 60, "jobs running")
        # The broker goes away mid-run (jobs running, delayed ones held) and comes back.
        await asyncio.to_thread(stop_broker, own)
        await asyncio.sleep(3)
        await asyncio.to_thread(start_broker, own)
        await until(lambda: len(done()) == len(ids), 120, "every job done")
        await until(lambda: all_in(pipe, ids, {"COMPLETED"}), 60, "every status COMPLETED")
        for job_id in ids:
            status = status_of(pipe, job_id)
            assert status is not None
            assert [h["state"] for h in status["history"]].count("COMPLETED") == 1
        # A function runs twice only for an attempt whose COMPLETED status the broker had
        # not confirmed when it went: at most the slots running then.
        twice = [job_id for job_id, n in done().items() if n > 1]
        assert len(twice) <= 10, twice
    finally:
        if pipe is not None:
            await asyncio.to_thread(pipe.stop)
        await asyncio.to_thread(stop_broker, own)


async def test_priorities_paused_for_read_ahead_are_read_again_after_kills(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    # A read-ahead of 50: each priority is paused and resumed on the consumer again and
    # again while a worker is killed and comes back; no partition may stay paused.
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, concurrency=10)
    pipe.env["SLUICE_JOBS_MAX_READY"] = "50"
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway")
    try:
        async with aiohttp.ClientSession() as session:
            ids = await submit(
                session,
                pipe,
                [
                    {"payload": {"ledger": ledger, "sleep": 0.01}, "priority": i % 3}
                    for i in range(1500)
                ],
            )
        await asyncio.to_thread(pipe.start, "jobs", "jobs2")

        def done() -> int:
            return len({line["id"] for line in read_ledger(ledger) if line["what"] == "done"})

        for stop_at in (300, 800):
            await until(lambda n=stop_at: done() > n, 60, f"{stop_at} jobs done")  # type: ignore[misc]
            os.kill(pipe.pid("jobs"), signal.SIGKILL)
            await asyncio.sleep(1)
            await asyncio.to_thread(pipe.start, "jobs")
        await until(lambda: done() == len(ids), 90, "every job done")
    finally:
        await asyncio.to_thread(pipe.stop)


async def test_a_queue_of_one_priority_holding_its_read_ahead_reads_on_and_rebalances(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    # One priority, a read-ahead of 50 and jobs slow enough (2 at a time, 50 ms each) that
    # the 50 take longer than the 2 s a loop holds its reads: it holds, then pauses and
    # resumes, while a worker is killed and the group rebalances. Every job runs.
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, priorities=1, concurrency=2)
    pipe.env["SLUICE_JOBS_MAX_READY"] = "50"
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway")
    try:
        async with aiohttp.ClientSession() as session:
            ids = await submit(
                session, pipe, [{"payload": {"ledger": ledger, "sleep": 0.05}} for _ in range(500)]
            )
        await asyncio.to_thread(pipe.start, "jobs", "jobs2")

        def done() -> Counter[str]:
            return Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "done")

        await until(lambda: len(done()) > 150, 60, "150 jobs done")
        os.kill(pipe.pid("jobs"), signal.SIGKILL)
        await asyncio.sleep(1)
        await asyncio.to_thread(pipe.start, "jobs")
        await until(lambda: len(done()) == len(ids), 90, "every job done")
        # Twice only for a job the killed worker ran and had not finished writing.
        assert sum(n - 1 for n in done().values()) <= 4
        assert all_in(pipe, ids, {"COMPLETED"})
    finally:
        await asyncio.to_thread(pipe.stop)
