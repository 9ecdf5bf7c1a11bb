"""Job workers on the real broker through failures and requests: a killed worker's jobs
come back after their lease, cancelled jobs never run, and a schedule fires once per tick
with three workers coming and going."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.configs import SUBMIT_KEY, Configs
from tests.job_functions import read_ledger
from tests.jobs_api import BEARER, all_in, queue_pipeline, status_of, submit
from tests.pipeline import Pipeline, http_json, until

pytestmark = pytest.mark.integration


async def test_a_killed_worker_gives_its_jobs_back_after_the_lease_and_none_is_lost(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, concurrency=20, max_attempts=5)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs", "jobs2")
    try:
        async with aiohttp.ClientSession() as session:
            ids = await submit(
                session,
                pipe,
                [
                    {"payload": {"ledger": ledger, "sleep": 0.2}, "priority": i % 3}
                    for i in range(1500)
                ],
            )

        def done() -> int:
            return len({line["id"] for line in read_ledger(ledger) if line["what"] == "done"})

        await until(lambda: done() > 150, 60, "jobs running")
        os.kill(pipe.pid("jobs"), signal.SIGKILL)
        await until(lambda: done() > 600, 90, "jobs running after the first kill")
        await asyncio.to_thread(pipe.start, "jobs")
        await until(lambda: done() > 900, 90, "jobs running after the restart")
        os.kill(pipe.pid("jobs2"), signal.SIGKILL)
        await until(lambda: done() == len(ids), 120, "every job completed")
        await until(lambda: all_in(pipe, ids, {"COMPLETED"}), 60, "every status COMPLETED")
        lines = read_ledger(ledger)
        completions = Counter(line["id"] for line in lines if line["what"] == "done")
        assert set(completions) == set(ids)
        # A job runs again only when its worker was killed while it ran (it completed,
        # its status did not): at most the slots of the two killed workers.
        twice = [job_id for job_id, n in completions.items() if n > 1]
        assert len(twice) <= 2 * 20, len(twice)
        # Jobs that were running when a worker died: their history shows the expired
        # lease, and another attempt completed them.
        stalled = []
        for job_id in ids:
            status = status_of(pipe, job_id)
            assert status is not None
            assert [h["state"] for h in status["history"]].count("COMPLETED") == 1
            if any(h.get("note") == "lease expired" for h in status["history"]):
                stalled.append(status)
        assert stalled, "no job was caught running by a kill"
        for status in stalled:
            assert status["attempt"] >= 2
        metrics = await asyncio.to_thread(
            http_json, f"http://127.0.0.1:{pipe.job_ports['jobs']}/health"
        )
        assert metrics["status"] == "ok"
    finally:
        pipe.stop()


async def _delete(
    session: aiohttp.ClientSession, pipe: Pipeline, job_id: str, query: str = ""
) -> tuple[int, dict[str, Any]]:
    async with session.delete(
        f"{pipe.gateway_url}/v1/jobs/{job_id}{query}", headers=BEARER
    ) as resp:
        return resp.status, await resp.json()


async def test_cancelled_pending_and_scheduled_jobs_never_run_and_end_cancelled(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    # One slot, taken by a slow job: the jobs behind it are read and waiting.
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, concurrency=1, partitions=1)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway")
    try:
        async with aiohttp.ClientSession() as session:
            # Submitted while no worker runs: the cancel waits on the topic behind it.
            (early,) = await submit(session, pipe, [{"payload": {"ledger": ledger}}])
            status, body = await _delete(session, pipe, early, "?queue=work")
            assert (status, body["state"]) == (202, "CANCELLING"), body
            await asyncio.to_thread(pipe.start, "jobs")
            (blocker,) = await submit(session, pipe, [{"payload": {"ledger": ledger, "sleep": 4}}])
            waiting = await submit(session, pipe, [{"payload": {"ledger": ledger}}] * 6)
            scheduled = await submit(
                session, pipe, [{"payload": {"ledger": ledger}, "delay_ms": 6000}] * 4
            )
            await until(lambda: (status_of(pipe, blocker) or {}).get("state") == "ACTIVE", 20)
            await until(
                lambda: (status_of(pipe, scheduled[-1]) or {}).get("state") == "SCHEDULED", 20
            )
            cancel = [waiting[1], waiting[4], scheduled[0], scheduled[2]]
            for job_id in cancel[:-1]:
                status, body = await _delete(session, pipe, job_id, "?queue=work")
                assert status == 200, body
                assert body["state"] == "CANCELLED"
            # From a shell too.
            cli = [sys.executable, "-m", "ops.cli", "jobs", "cancel", cancel[-1]]
            cli += ["--key", SUBMIT_KEY, "--gateway", pipe.gateway_url]
            done = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert done.stdout.split()[1:] == ["CANCELLED", "on", "queue", "work"]
            again = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True)
            assert again.returncode == 1
            assert "409" in again.stderr
            assert "CANCELLED already" in again.stderr
            # A running job and a finished one cannot be cancelled.
            status, body = await _delete(session, pipe, blocker)
            assert status == 409
            assert "ACTIVE" in body["error"]
            await until(lambda: (status_of(pipe, waiting[0]) or {}).get("state") == "COMPLETED", 30)
            status, body = await _delete(session, pipe, waiting[0])
            assert status == 409
            assert "COMPLETED" in body["error"]
            # Unknown jobs and queues.
            assert (await _delete(session, pipe, "no-such-job"))[0] == 404
            assert (await _delete(session, pipe, "no-such-job", "?queue=nope"))[0] == 404
        rest = [blocker, *(w for w in waiting if w not in cancel)]
        rest += [s for s in scheduled if s not in cancel]
        await until(lambda: all_in(pipe, rest, {"COMPLETED"}), 60, "the others completed")
        await asyncio.sleep(1)
        ran = {line["id"] for line in read_ledger(ledger)}
        assert ran == set(rest)
        for job_id in [early, *cancel]:
            final = status_of(pipe, job_id)
            assert final is not None
            assert final["state"] == "CANCELLED", final
            assert "ACTIVE" not in [h["state"] for h in final["history"]]
        counts = http_json(f"{pipe.gateway_url}/v1/queues/work", headers=BEARER)["counts"]
        assert counts["CANCELLED"] == 1 + len(cancel)
    finally:
        pipe.stop()


async def test_a_schedule_every_second_fires_once_per_tick_with_three_workers(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    ledger = str(tmp_path / "ledger.jsonl")
    schedule = {"name": "tick", "cron": "* * * * * *", "payload": {"ledger": ledger}}
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, schedules=[schedule])
    await asyncio.to_thread(pipe.start, "gateway", "jobs", "jobs2", "jobs3")
    try:
        began = time.time()
        await asyncio.sleep(12)
        # The owner of the schedules leaves (and another takes them over), then comes back.
        for name in ("jobs", "jobs2"):
            await asyncio.to_thread(pipe.stop, name)
            await asyncio.sleep(4)
            await asyncio.to_thread(pipe.start, name)
            await asyncio.sleep(4)
        await asyncio.sleep(max(0.0, 30 - (time.time() - began)))
        ended = time.time()
        await asyncio.sleep(2)
        lines = read_ledger(ledger)
        done = Counter(line["id"] for line in lines if line["what"] == "done")
        starts = Counter(line["id"] for line in lines if line["what"] == "start")
        assert all(n == 1 for n in starts.values()), starts.most_common(3)
        assert all(n == 1 for n in done.values())
        # One job per tick: every second from a little after the start to the end.
        fired = {}
        for job_id in done:
            status = status_of(pipe, job_id)
            assert status is not None
            (tick,) = (int(t[5:]) for t in status["tags"] if t.startswith("tick:"))
            assert tick not in fired, tick
            fired[tick] = status
        wanted = set(range(int(began) + 3, int(ended)))
        seen = {tick // 1000 for tick in fired}
        assert wanted <= seen, sorted(wanted - seen)
        assert len(fired) >= 25
    finally:
        pipe.stop()
