"""Dead jobs on the real broker: `sluice dlq list|show|redrive jobs.<queue>` with a
gateway and a job worker process; a redriven job runs again under its id, once."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

import ops.cli_dlq
from core.settings import KafkaSettings
from ops.cli import app
from tests.configs import Configs
from tests.job_functions import read_ledger
from tests.jobs_api import all_in, queue_pipeline, status_of, submit
from tests.pipeline import group_lag, read_records, until

pytestmark = pytest.mark.integration


def _headers(msg: Any) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in msg.headers() or []}


async def test_a_dead_job_is_listed_shown_and_redriven_to_complete_once_under_its_id(
    configs: Configs, broker: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, max_attempts=2)
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", prefix)
    monkeypatch.setattr(ops.cli_dlq.console, "width", 1000)  # no folded ids or JSON
    cli = CliRunner()

    def dlq(*args: str) -> str:
        result = cli.invoke(app, ["dlq", *args])
        assert result.exit_code == 0, result.output
        return result.output

    ledger = str(tmp_path / "ledger.jsonl")
    broken = tmp_path / "broken"
    broken.touch()
    payload = {"ledger": ledger, "fail_while": str(broken)}
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            first, second = await submit(
                session,
                pipe,
                [
                    {"payload": {**payload, "n": 1}, "priority": 2},
                    {"payload": {**payload, "n": 2}, "ordering_key": "user-7"},
                ],
            )
        both = [first, second]
        await until(lambda: all_in(pipe, both, {"DEAD"}), 60, "both jobs dead")

        # Listed next to the destinations' DLQs, and as dead jobs.
        overview = await asyncio.to_thread(dlq, "list")
        row = next(line for line in overview.splitlines() if "jobs.work " in line)
        assert f"{prefix}.jobs.work.dlq" in row
        assert row.split("│")[-2].strip() == "2"
        assert "warehouse" in overview
        listing = await asyncio.to_thread(dlq, "list", "jobs.work")
        assert "2 dead jobs" in listing
        assert first in listing
        assert second in listing
        letters = {
            msg.key().decode(): f"{msg.partition()}:{msg.offset()}"
            for msg in read_records(kafka, f"{prefix}.jobs.work.dlq")
        }
        assert set(letters) == {first, "user-7"}
        shown = orjson.loads(await asyncio.to_thread(dlq, "show", "jobs.work", letters[first]))
        assert shown["job_id"] == first
        assert shown["queue"] == "work"
        assert shown["priority"] == 2
        assert shown["attempts"] == 2
        assert shown["error_class"] == "RuntimeError"
        assert shown["error_message"] == "broken while broken exists"
        assert shown["first_failure"] <= shown["last_failure"]
        assert shown["payload"] == {**payload, "n": 1}

        dry = await asyncio.to_thread(dlq, "redrive", "jobs.work", "--dry-run")
        assert "would redrive 2 of 2 matching records" in dry
        await asyncio.sleep(1)
        assert all_in(pipe, both, {"DEAD"})

        # The cause fixed, the redrive: both jobs run again under their ids, once.
        broken.unlink()
        done = await asyncio.to_thread(dlq, "redrive", "jobs.work", "--rate", "50")
        assert "redrove 2 of 2 matching records (0 already redriven)" in done
        await until(lambda: all_in(pipe, both, {"COMPLETED"}), 60, "both jobs completed")
        for job_id, ref in ((first, letters[first]), (second, letters["user-7"])):
            status = status_of(pipe, job_id)
            assert status is not None
            assert (status["id"], status["attempt"], status["redrives"]) == (job_id, 1, [ref])
            history = status["history"]
            assert [(h["state"], h["attempt"]) for h in history] == [
                ("ACTIVE", 1),
                ("FAILED", 1),
                ("ACTIVE", 2),
                ("DEAD", 2),
                ("PENDING", 1),
                ("ACTIVE", 1),
                ("COMPLETED", 1),
            ]
            assert history[4]["note"] == f"redriven from the DLQ record {ref}"
        starts = Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "start")
        dones = Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "done")
        assert starts == {first: 3, second: 3}
        assert dones == {first: 1, second: 1}

        # The redriven record: on the job's priority topic and partition, its key kept,
        # attempt and failure headers off, the DLQ record it came from as the marker.
        redriven = [
            msg
            for msg in read_records(kafka, f"{prefix}.jobs.work.p2")
            if "sluice.job.redrive" in _headers(msg)
        ]
        assert len(redriven) == 1
        record = redriven[0]
        headers = _headers(record)
        assert headers["sluice.job.redrive"] == letters[first]
        assert record.key().decode() == first
        first_status = status_of(pipe, first)
        assert first_status is not None
        assert record.partition() == first_status["partition"]
        for gone in ("sluice.job.attempt", "sluice.job.due", "sluice.error.class"):
            assert gone not in headers

        # Redriving again sends nothing; a copy of the redriven record is skipped, and a
        # copy of the dead letter finds the job COMPLETED.
        again = await asyncio.to_thread(dlq, "redrive", "jobs.work")
        assert "redrove 0 of 2 matching records (2 already redriven)" in again
        producer = Producer(kafka.client_config())
        producer.produce(
            record.topic(),
            record.value(),
            record.key(),
            partition=record.partition(),
            headers=record.headers(),
        )
        dead = next(
            m for m in read_records(kafka, f"{prefix}.jobs.work.dlq") if m.key() == first.encode()
        )
        producer.produce(dead.topic(), dead.value(), dead.key(), headers=dead.headers())
        assert producer.flush(30) == 0
        third = await asyncio.to_thread(dlq, "redrive", "jobs.work")
        assert f"job {first} is COMPLETED now: not redriven" in third
        assert "redrove 0 of 3 matching records (2 already redriven)" in third
        group, topics = f"{prefix}-jobs-work", [f"{prefix}.jobs.work.p{p}" for p in range(3)]
        await until(lambda: group_lag(kafka, group, topics) == 0, 30, "the copy read")
        await asyncio.sleep(1)
        assert Counter(line["id"] for line in read_ledger(ledger)) == {first: 4, second: 4}
        after = status_of(pipe, first)
        assert after is not None
        assert (after["state"], len(after["history"])) == ("COMPLETED", 7)
    finally:
        pipe.stop()
