"""Job worker processes on the real broker: jobs submitted over HTTP run, retry with
backoff, end DEAD in the DLQ with failure headers, wait for their delay, share the
starts by priority and keep the order of their ordering key."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.settings import KafkaSettings
from tests.configs import Configs
from tests.job_functions import read_ledger
from tests.jobs_api import BEARER, all_in, queue_pipeline, states_of, status_of, submit
from tests.pipeline import http_json, read_records, until

pytestmark = pytest.mark.integration


async def test_jobs_complete_retry_with_backoff_and_die_into_the_dlq_with_reasons(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, max_attempts=3)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            fine = await submit(
                session, pipe, [{"payload": {"ledger": ledger, "n": i}} for i in range(20)]
            )
            (flaky,) = await submit(
                session, pipe, [{"payload": {"ledger": ledger, "fail_attempts": 2}}]
            )
            (hopeless,) = await submit(
                session, pipe, [{"payload": {"ledger": ledger, "fail_always": True}}]
            )
            (fatal,) = await submit(
                session, pipe, [{"payload": {"ledger": ledger, "fatal": True}, "priority": 2}]
            )
        everyone = [*fine, flaky, hopeless, fatal]
        await until(lambda: all_in(pipe, everyone, {"COMPLETED", "DEAD"}), 60, "every job finished")
        states = states_of(pipe, everyone)
        assert {states[i] for i in fine} == {"COMPLETED"}
        assert states[flaky] == "COMPLETED"
        assert states[hopeless] == "DEAD"
        assert states[fatal] == "DEAD"

        # The flaky job: two failed attempts in its history, each followed by a wait of
        # the backoff, then completed on the third.
        flaky_status = status_of(pipe, flaky)
        assert flaky_status is not None
        assert flaky_status["attempt"] == 3
        assert flaky_status["result"] == {"n": None, "attempt": 3}
        history = flaky_status["history"]
        assert [h["state"] for h in history] == [
            "ACTIVE",
            "FAILED",
            "ACTIVE",
            "FAILED",
            "ACTIVE",
            "COMPLETED",
        ]
        assert [h["attempt"] for h in history] == [1, 1, 2, 2, 3, 3]
        for failed, again in ((history[1], history[2]), (history[3], history[4])):
            assert "attempt 1 fails" in failed["error"] or "attempt 2 fails" in failed["error"]
            # Backoff 100 ms then 200 ms, +/- 10 %: the next attempt waited for it.
            assert again["at_ms"] >= failed["due_ms"] - 5
            assert failed["due_ms"] - failed["at_ms"] >= 90
        hopeless_status = status_of(pipe, hopeless)
        assert hopeless_status is not None
        assert hopeless_status["attempt"] == 3
        assert "fails on purpose" in hopeless_status["error"]
        fatal_status = status_of(pipe, fatal)
        assert fatal_status is not None
        assert fatal_status["attempt"] == 1
        assert fatal_status["error"].startswith("Fatal: ")

        # The ledger: every completed job once, the dead ones never completed.
        done = Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "done")
        assert done == Counter([*fine, flaky])
        starts = Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "start")
        assert starts[hopeless] == 3
        assert starts[fatal] == 1

        # The DLQ: both dead jobs with the failure headers of event DLQs.
        kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
        dead = {}
        for msg in read_records(kafka, f"{prefix}.jobs.work.dlq"):
            headers = {k: (v or b"").decode() for k, v in msg.headers() or []}
            dead[msg.key().decode()] = headers
        assert set(dead) == {hopeless, fatal}
        assert dead[hopeless]["sluice.error.class"] == "RuntimeError"
        assert dead[hopeless]["sluice.attempts"] == "3"
        assert dead[hopeless]["sluice.stage"] == "job"
        assert dead[hopeless]["sluice.original.topic"] == f"{prefix}.jobs.work.p0"
        assert dead[fatal]["sluice.error.class"] == "Fatal"
        assert dead[fatal]["sluice.attempts"] == "1"
        assert dead[fatal]["sluice.original.topic"] == f"{prefix}.jobs.work.p2"

        # The queue's counts and listing agree.
        counts = http_json(f"{pipe.gateway_url}/v1/queues/work", headers=BEARER)["counts"]
        assert counts["COMPLETED"] == len(fine) + 1
        assert counts["DEAD"] == 2
        listed = http_json(f"{pipe.gateway_url}/v1/jobs?queue=work&state=dead", headers=BEARER)
        assert {j["id"] for j in listed["jobs"]} == {hopeless, fatal}
    finally:
        pipe.stop()


async def test_an_attempt_over_its_timeout_fails_and_the_job_dies_when_its_attempts_are_spent(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, max_attempts=2, timeout_s=1.5)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            (own,) = await submit(
                session, pipe, [{"payload": {"ledger": ledger, "sleep": 30}, "timeout_ms": 400}]
            )
            (queues,) = await submit(session, pipe, [{"payload": {"ledger": ledger, "sleep": 30}}])
            (quick,) = await submit(session, pipe, [{"payload": {"ledger": ledger, "sleep": 0.2}}])
        everyone = [own, queues, quick]
        await until(lambda: all_in(pipe, everyone, {"COMPLETED", "DEAD"}), 30, "every job finished")
        assert states_of(pipe, everyone) == {own: "DEAD", queues: "DEAD", quick: "COMPLETED"}
        for job_id, timeout_ms in ((own, 400), (queues, 1500)):
            status = status_of(pipe, job_id)
            assert status is not None
            history = status["history"]
            assert [h["state"] for h in history] == ["ACTIVE", "FAILED", "ACTIVE", "DEAD"]
            for start, end in ((history[0], history[1]), (history[2], history[3])):
                assert (
                    f"JobTimeout: the attempt ran over its timeout of {timeout_ms / 1000:g} s"
                    in (end["error"])
                )
                # Ended at its timeout (looked at every 100 ms), not at the end of its sleep.
                assert timeout_ms <= end["at_ms"] - start["at_ms"] < timeout_ms + 600
        # Neither timed-out job ran to its end; each started twice.
        lines = read_ledger(ledger)
        done = Counter(line["id"] for line in lines if line["what"] == "done")
        starts = Counter(line["id"] for line in lines if line["what"] == "start")
        assert done == Counter([quick])
        assert starts[own] == starts[queues] == 2
    finally:
        pipe.stop()


async def test_delayed_jobs_never_start_early_and_start_within_a_second_across_a_restart(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, concurrency=50, partitions=4)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs", "jobs2")
    try:
        delays = [(i * 37) % 10_000 for i in range(1000)]
        async with aiohttp.ClientSession() as session:
            submitted = time.time()
            ids = await submit(
                session,
                pipe,
                [{"payload": {"ledger": ledger}, "delay_ms": d} for d in delays],
            )
            # Scheduled ones say so, with their due time.
            late = ids[delays.index(max(delays))]
            await until(lambda: (status_of(pipe, late) or {}).get("state") == "SCHEDULED", 10)
        # A worker restarts while most jobs wait: the other one takes its partitions, and
        # the held records are read again from the last commit.
        await asyncio.sleep(max(0.0, submitted + 4 - time.time()))
        await asyncio.to_thread(pipe.stop, "jobs")
        await asyncio.to_thread(pipe.start, "jobs")
        await until(lambda: len(read_ledger(ledger)) >= 2 * len(ids), 60, "every job run")
        started: dict[str, float] = {}
        for line in read_ledger(ledger):
            if line["what"] == "start":
                started.setdefault(line["id"], line["at"])
        assert set(started) == set(ids)
        lateness = []
        for job_id, delay in zip(ids, delays, strict=True):
            due = status_of(pipe, job_id)
            assert due is not None
            assert due["state"] == "COMPLETED"
            # The gateway took the job at `submitted_at`; it may not start before + delay.
            earliest = due["submitted_at_ms"] / 1000 + delay / 1000
            assert started[job_id] >= earliest - 0.002, (job_id, delay)
            lateness.append(started[job_id] - earliest)
        worst = sorted(zip(lateness, delays, strict=True))[-12:]
        lateness.sort()
        assert lateness[int(len(lateness) * 0.99) - 1] <= 1.0, worst
        assert time.time() - submitted < 60
    finally:
        pipe.stop()


async def test_priorities_share_the_starts_by_weight_and_none_starves(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    # One slot: the starts are the scheduler's choices, one at a time.
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, concurrency=1, partitions=1)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway")
    try:
        async with aiohttp.ClientSession() as session:
            low = await submit(session, pipe, [{"payload": {"ledger": ledger}, "priority": 0}] * 60)
            high = await submit(
                session, pipe, [{"payload": {"ledger": ledger}, "priority": 2}] * 60
            )
        # Every job is waiting when the worker starts: both priorities are saturated.
        await asyncio.to_thread(pipe.start, "jobs")
        await until(lambda: len(read_ledger(ledger)) >= 2 * 120, 60, "every job run")
        order = [line["id"] for line in read_ledger(ledger) if line["what"] == "start"]
        lows = set(low)
        # While both have jobs ready (the first 60 starts: 48 of priority 2 at 4:1), the
        # documented share holds: priority 0 gets 1 start in 5, priority 2 gets 4.
        first = order[:60]
        low_share = sum(1 for job_id in first if job_id in lows)
        assert 10 <= low_share <= 14, low_share
        assert set(order) == lows | set(high)
        # Within a priority, submit order.
        assert [i for i in order if i in lows] == low
        # Higher priorities waited less on average.
        position = {job_id: n for n, job_id in enumerate(order)}
        assert sum(position[i] for i in high) / 60 < sum(position[i] for i in low) / 60
    finally:
        pipe.stop()


async def test_an_ordering_key_runs_its_jobs_one_at_a_time_in_submit_order_across_retries(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, concurrency=20, max_attempts=4)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        # 20 keys x 50 jobs, a random third of them failing once or twice before they work.
        rng = random.Random(11)
        keys = [f"key-{k}" for k in range(20)]
        jobs = [
            {
                "payload": {
                    "ledger": ledger,
                    "sleep": 0.01,
                    "fail_attempts": rng.choice((0, 0, 0, 0, 1, 2)),
                },
                "ordering_key": key,
            }
            for _ in range(50)
            for key in keys
        ]
        async with aiohttp.ClientSession() as session:
            ids = await submit(session, pipe, jobs)
        key_of = {job_id: str(job["ordering_key"]) for job_id, job in zip(ids, jobs, strict=True)}
        await until(
            lambda: sum(1 for line in read_ledger(ledger) if line["what"] == "done") >= len(ids),
            90,
            "every job completed",
        )
        lines = read_ledger(ledger)
        per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for line in lines:
            per_key[key_of[line["id"]]].append(line)
        for key, events in per_key.items():
            # One at a time: start, (done), start, ... never two starts in a row but for
            # a failed attempt's retry of the same job.
            running: str | None = None
            completed: list[str] = []
            for event in events:
                if event["what"] == "start":
                    assert running is None or running == event["id"], (key, event)
                    running = event["id"]
                else:
                    assert running == event["id"], (key, event)
                    completed.append(event["id"])
                    running = None
            wanted = [job_id for job_id in ids if key_of[job_id] == key]
            assert completed == wanted, key
        # Some jobs did fail and retry on the way.
        assert sum(1 for line in lines if line["what"] == "start") > len(ids)
    finally:
        pipe.stop()
