"""A queue's rate limit and concurrency cap hold for three job worker processes together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.configs import SUBMIT_KEY, Configs
from tests.job_functions import read_ledger
from tests.pipeline import pipeline_with_topics, probe, until

pytestmark = pytest.mark.integration

BEARER = {"Authorization": f"Bearer {SUBMIT_KEY}"}
RATE, BURST, CAP = 50.0, 10, 5


async def test_rate_and_concurrency_limits_hold_across_three_worker_processes(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    queue = configs.queue(
        "work",
        priorities=1,
        partitions=6,
        concurrency=10,
        max_concurrency=CAP,
        rate_limit={"jobs_per_s": RATE, "burst": BURST},
        executor={"type": "python", "function": "tests.job_functions:ledger"},
    )
    pipe = pipeline_with_topics(
        tmp_path, broker, prefix, configs.text(configs.warehouse(), queues=[queue])
    )
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs", "jobs2", "jobs3")
    try:
        # The three have joined the group and share its partitions.
        def queues_ready() -> bool:
            return all(probe(pipe.job_ports[n])[0] == 200 for n in ("jobs", "jobs2", "jobs3"))

        await until(queues_ready, 30, "every job worker ready")
        await asyncio.sleep(5)
        count = 600
        async with aiohttp.ClientSession() as session:
            for _ in range(0, count, 200):
                jobs = [
                    {"queue": "work", "payload": {"ledger": ledger, "sleep": 0.05}}
                    for _ in range(200)
                ]
                async with session.post(
                    f"{pipe.gateway_url}/v1/jobs/batch", json={"jobs": jobs}, headers=BEARER
                ) as resp:
                    assert resp.status == 202, await resp.text()
        await until(
            lambda: sum(1 for line in read_ledger(ledger) if line["what"] == "done") >= count,
            60,
            "every job done",
        )
        lines = read_ledger(ledger)
        starts = sorted(line["at"] for line in lines if line["what"] == "start")
        assert len(starts) == count
        # No 1-second window above rate plus burst.
        j = 0
        worst = 0
        for i, t in enumerate(starts):
            while starts[j] < t - 1.0:
                j += 1
            worst = max(worst, i - j + 1)
        assert worst <= RATE + BURST, worst
        # Never more than the cap running at once (every start and end is a sample).
        edges = sorted(
            [(line["at"], 1) for line in lines if line["what"] == "start"]
            + [(line["at"], -1) for line in lines if line["what"] == "done"],
            key=lambda e: (e[0], e[1]),
        )
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        assert peak <= CAP, peak
        # The limit is used: within 10 % of it while every process has jobs of its own
        # partitions ready (about 200 each, 12 s at its share; the first second has the burst).
        steady = [t for t in starts if starts[0] + 1 <= t < starts[0] + 9]
        assert len(steady) / 8 >= RATE * 0.9, f"{len(steady) / 8:.1f} jobs/s of {RATE}"
    finally:
        pipe.stop()
