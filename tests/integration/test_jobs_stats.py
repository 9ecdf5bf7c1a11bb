"""A queue's figures over HTTP, in the CLI and in the gateway's metrics; finished jobs'
statuses deleted after their retention by a tombstone, and an idempotency key that
keeps its job for `idempotency_s` and submits a new run of it once the status is gone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from core.jobs import idempotent_id
from core.settings import KafkaSettings
from tests.configs import SUBMIT_KEY, Configs
from tests.job_functions import read_ledger
from tests.jobs_api import BEARER, LEDGER_FN, all_in, status_of, submit
from tests.pipeline import http_json, http_text, pipeline_with_topics, read_records, until

pytestmark = pytest.mark.integration


def _code(url: str) -> int:
    req = urllib.request.Request(url, headers=BEARER)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_queue_figures_count_rate_and_time_the_jobs_that_ran(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    config = configs.text(
        configs.warehouse(),
        queues=[
            configs.queue("work", priorities=2, partitions=2, executor=LEDGER_FN, concurrency=10),
            configs.queue("idle", priorities=1, partitions=1),
            configs.queue("private", priorities=1, partitions=1, keys=["private-key"]),
        ],
    )
    pipe = pipeline_with_topics(tmp_path, broker, prefix, config)
    ledger = str(tmp_path / "ledger.jsonl")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            jobs = [{"payload": {"ledger": ledger, "sleep": 0.2}} for _ in range(50)]
            ids = await submit(session, pipe, [*jobs, {"payload": {"ledger": ledger, "fatal": 1}}])
        await until(lambda: all_in(pipe, ids, {"COMPLETED", "DEAD"}), 60, "every job finished")

        work = http_json(f"{pipe.gateway_url}/v1/queues/work", headers=BEARER)
        assert work["counts"] == {
            "PENDING": 0,
            "SCHEDULED": 0,
            "ACTIVE": 0,
            "FAILED": 0,
            "COMPLETED": 50,
            "DEAD": 1,
            "CANCELLED": 0,
        }
        assert work["in_flight"] == 0
        rates = work["rates"]
        assert rates["window_s"] == 60
        # Everything happened in the last minute: the rates are those counts over 60 s.
        assert {k: round(rates[k] * 60) for k in ("submitted", "started", "completed", "dead")} == {
            "submitted": 51,
            "started": 51,
            "completed": 50,
            "dead": 1,
        }
        latency = work["latency"]
        assert latency["attempts"] == 51
        run, wait = latency["run_ms"], latency["wait_ms"]
        # 50 runs of 200 ms (and one that failed at once): p50 and p90 are about 200 ms.
        assert 195 <= run["p50"] <= 600, run
        assert 195 <= run["p90"] <= run["p99"] <= 2000, run
        # 10 at a time: the last of the 51 waited about 5 rounds of 200 ms.
        assert 0 <= wait["p50"] <= wait["p90"] <= wait["p99"] <= 20_000, wait
        assert wait["p99"] >= 600, wait

        # Every queue the key may use; not the one of another key.
        listed = http_json(f"{pipe.gateway_url}/v1/queues", headers=BEARER)["queues"]
        assert [q["queue"] for q in listed] == ["idle", "work"]
        assert listed[1]["counts"] == work["counts"]
        assert set(listed[0]["counts"].values()) == {0}
        assert listed[0]["latency"]["run_ms"] == {"p50": None, "p90": None, "p99": None}
        assert _code(f"{pipe.gateway_url}/v1/queues/private") == 403

        # The gateway's metrics: jobs enqueued per queue, DEAD jobs per queue.
        metrics = http_text(f"{pipe.gateway_url}/metrics")
        assert 'sluice_gateway_jobs_enqueued_total{queue="work"} 51.0' in metrics
        assert 'sluice_gateway_jobs_dead{queue="work"} 1.0' in metrics

        # The CLI: every queue of the key without a queue named.
        cli = [sys.executable, "-m", "ops.cli", "jobs", "stats", "--gateway", pipe.gateway_url]
        done = await asyncio.to_thread(
            subprocess.run, [*cli, "--key", SUBMIT_KEY], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "idle" in done.stdout
        assert "work" in done.stdout
        assert "COMPLETED" in done.stdout
    finally:
        await asyncio.to_thread(pipe.stop)


async def test_finished_statuses_expire_and_an_idempotency_key_keeps_its_job_until_then(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    config = configs.text(
        configs.warehouse(),
        queues=[
            configs.queue(
                "work",
                priorities=1,
                partitions=2,
                executor=LEDGER_FN,
                retention_s=2,
                idempotency_s=6,
            )
        ],
    )
    pipe = pipeline_with_topics(tmp_path, broker, prefix, config)
    ledger = str(tmp_path / "ledger.jsonl")
    keyed_id = idempotent_id("work", "order-7")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            submitted = time.time()
            (plain,) = await submit(session, pipe, [{"payload": {"ledger": ledger}}])
            keyed_job = {"payload": {"ledger": ledger}, "idempotency_key": "order-7"}
            assert await submit(session, pipe, [keyed_job]) == [keyed_id]
            await until(lambda: all_in(pipe, [plain, keyed_id], {"COMPLETED"}), 30, "both ran")
            plain_status = status_of(pipe, plain)
            assert plain_status is not None
            finished_ms = plain_status["updated_at_ms"]
            # While the status is there, the key is that job: submitted again, it does not run.
            assert await submit(session, pipe, [keyed_job]) == [keyed_id]

            # The plain job: gone (404) after retention_s, the keyed one still there.
            await until(
                lambda: _code(f"{pipe.gateway_url}/v1/jobs/{plain}") == 404, 15, "plain gone"
            )
            assert time.time() * 1000 >= finished_ms + 2000
            assert _code(f"{pipe.gateway_url}/v1/jobs/{keyed_id}") == 200
            assert time.time() < submitted + 6
            # The keyed job: not before submit + idempotency_s.
            await until(
                lambda: _code(f"{pipe.gateway_url}/v1/jobs/{keyed_id}") == 404, 15, "keyed gone"
            )
            assert time.time() >= submitted + 6
            counts = http_json(f"{pipe.gateway_url}/v1/queues/work", headers=BEARER)["counts"]
            assert counts["COMPLETED"] == 0

            # Once its status is gone, the key submits a new run of the job, same id.
            assert await submit(session, pipe, [keyed_job]) == [keyed_id]
            await until(lambda: all_in(pipe, [keyed_id], {"COMPLETED"}), 30, "the second run")
        again = status_of(pipe, keyed_id)
        assert again is not None
        assert again["submitted_at_ms"] >= (submitted + 6) * 1000
        assert [h["state"] for h in again["history"]] == ["ACTIVE", "COMPLETED"]
        done = Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "done")
        assert done == Counter({plain: 1, keyed_id: 2})
    finally:
        await asyncio.to_thread(pipe.stop)

    # The tombstones are on the compacted status topic, after each job's statuses.
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    records = [
        (m.key().decode(), m.value())
        for m in read_records(kafka, f"{prefix}.jobs.status")
        if m.key() is not None
    ]
    plain_records = [value for key, value in records if key == plain]
    assert plain_records[-1] is None
    assert all(value is not None for value in plain_records[:-1])
    keyed_values = [value is None for key, value in records if key == keyed_id]
    assert keyed_values.count(True) == 1
    assert keyed_values[-1] is False  # the second run's status, after the tombstone
