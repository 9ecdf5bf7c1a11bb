"""Submitting jobs over HTTP to real gateway processes: records on the queue's topics,
one id per idempotency key across gateways, and a clear 4xx for bad input with nothing
produced."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, TopicPartition

from core.settings import KafkaSettings
from gateway.jobs import job_id
from ops.processes import BackgroundProcess
from ops.traffic import basic_auth
from schemas.codec import job_codec
from tests.configs import SUBMIT_KEY, Configs
from tests.job_functions import read_ledger
from tests.jobs_api import all_in, queue_pipeline
from tests.pipeline import (
    Pipeline,
    free_port,
    http_json,
    pipeline_with_topics,
    read_records,
    until,
)

pytestmark = pytest.mark.integration

BEARER = {"Authorization": f"Bearer {SUBMIT_KEY}"}


def _pipeline(configs: Configs, broker: str, prefix: str, root: Path) -> Pipeline:
    config = configs.text(
        configs.warehouse(),
        queues=[
            configs.queue("work", priorities=3, max_payload_bytes=1000),
            configs.queue("other", keys=["other-key"]),
        ],
    )
    return pipeline_with_topics(root, broker, prefix, config)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = BEARER,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
    async with session.post(url, headers=headers or {}, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


def _high_watermarks(kafka: KafkaSettings, topics: list[str]) -> dict[str, int]:
    consumer = Consumer(kafka.client_config() | {"group.id": f"marks-{uuid.uuid4()}"})
    try:
        marks: dict[str, int] = {}
        for topic in topics:
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            marks[topic] = sum(
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in parts
            )
        return marks
    finally:
        consumer.close()


async def test_submitted_jobs_are_on_their_priority_topics_once_acknowledged(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = _pipeline(configs, broker, prefix, tmp_path)
    await asyncio.to_thread(pipe.start, "gateway")
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    url = f"{pipe.gateway_url}/v1/jobs"
    try:
        async with aiohttp.ClientSession() as session:
            before = time.time() * 1000
            status, one = await _post(
                session,
                url,
                {"queue": "work", "payload": {"n": 1}, "priority": 2, "tags": ["a"]},
            )
            assert status == 202, one
            assert (one["queue"], one["state"]) == ("work", "PENDING")
            status, batch = await _post(
                session,
                f"{url}/batch",
                {
                    "jobs": [
                        {"queue": "work", "payload": "x", "delay_ms": 5000},
                        {"queue": "work", "payload": [1, 2], "ordering_key": "acct-7"},
                        {"queue": "work", "idempotency_key": "k-1", "max_attempts": 9},
                    ]
                },
            )
            assert status == 202, batch
        # The CLI: an id and its state, or a one-line reason and exit status 1.
        cli = [sys.executable, "-m", "ops.cli", "jobs", "submit", "work", "--gateway"]
        cli += [pipe.gateway_url, "--payload", '{"cli": true}', "--delay-ms", "1000"]
        done = await asyncio.to_thread(
            subprocess.run, [*cli, "--key", SUBMIT_KEY], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[1:] == ["SCHEDULED", "on", "queue", "work"]
        refused = await asyncio.to_thread(
            subprocess.run, [*cli, "--key", "nope"], capture_output=True, text=True
        )
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            "error: the gateway answered 401: unknown or missing submit key"
        ]
    finally:
        await asyncio.to_thread(pipe.stop)

    codec = job_codec(logical_types=False)
    topics = [f"{prefix}.jobs.work.p{n}" for n in range(3)]
    on_topics = {t: await asyncio.to_thread(read_records, kafka, t) for t in topics}
    assert [len(on_topics[t]) for t in topics] == [4, 0, 1]
    (high,) = on_topics[topics[2]]
    job = codec.decode(high.value())
    assert (job["job_id"], high.key()) == (one["id"], one["id"].encode())
    assert (job["priority"], job["payload"], job["tags"]) == (2, '{"n":1}', ["a"])
    assert before <= job["submitted_at"] <= time.time() * 1000

    states = [j["state"] for j in batch["jobs"]]
    assert states == ["SCHEDULED", "PENDING", "PENDING"]
    by_id = {j["job_id"]: j for j in (codec.decode(r.value()) for r in on_topics[topics[0]])}
    assert {j["payload"] for j in by_id.values()} >= {'{"cli":true}'}
    delayed, ordered, keyed = (by_id[j["id"]] for j in batch["jobs"])
    assert 4900 <= delayed["run_at"] - delayed["submitted_at"] <= 5100
    assert ordered["ordering_key"] == "acct-7"
    assert (keyed["idempotency_key"], keyed["max_attempts"]) == ("k-1", 9)
    assert keyed["job_id"] == job_id("work", "k-1") != job_id("other", "k-1")
    # No other queue got anything.
    other = [f"{prefix}.jobs.other.p{n}" for n in range(10)]
    assert set((await asyncio.to_thread(_high_watermarks, kafka, other)).values()) == {0}


async def test_one_idempotency_key_is_one_job_id_across_two_gateways(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    # A job worker runs the queue meanwhile: the one job runs once.
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, priorities=1)
    ledger = str(tmp_path / "ledger.jsonl")
    second = free_port()
    pipe.services["gateway-2"] = BackgroundProcess("gateway-2", tmp_path / "run")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    pipe.services["gateway-2"].start(["gateway"], {**pipe.env, "SLUICE_GATEWAY_PORT": str(second)})
    urls = [f"{pipe.gateway_url}/v1/jobs", f"http://127.0.0.1:{second}/v1/jobs"]
    try:
        await asyncio.to_thread(pipe._wait, f"http://127.0.0.1:{second}/health", "gateway-2")

        async def client(n: int, session: aiohttp.ClientSession) -> list[str]:
            ids = []
            for i in range(50):
                status, body = await _post(
                    session,
                    urls[(n + i) % 2],
                    {
                        "queue": "work",
                        "payload": {"ledger": ledger, "client": n},
                        "idempotency_key": "order-42",
                    },
                )
                assert status == 202, body
                ids.append(body["id"])
            return ids

        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(client(n, session) for n in range(20)))
        other_key = await asyncio.to_thread(
            http_json,
            urls[1],
            {"queue": "work", "payload": {"ledger": ledger}, "idempotency_key": "order-43"},
            10,
            BEARER,
        )
        (the_id,) = {jid for answer in answers for jid in answer}
        await until(lambda: all_in(pipe, [the_id, other_key["id"]], {"COMPLETED"}), 60, "both ran")
        await asyncio.sleep(2)  # a second run, were there one, would show by now
        runs = Counter(line["id"] for line in read_ledger(ledger) if line["what"] == "start")
        assert runs == {the_id: 1, other_key["id"]: 1}, runs
    finally:
        await asyncio.to_thread(pipe.stop)
    ids = {jid for answer in answers for jid in answer}
    assert (len(ids), sum(map(len, answers))) == (1, 1000)
    assert other_key["id"] not in ids
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    records = await asyncio.to_thread(read_records, kafka, f"{prefix}.jobs.work.p0")
    # Every submit is on the topic under the one id (and key): one partition, one job.
    assert len(records) == 1001
    assert {r.key() for r in records} == {next(iter(ids)).encode(), other_key["id"].encode()}


async def test_bad_submits_get_a_clear_4xx_and_produce_nothing(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = _pipeline(configs, broker, prefix, tmp_path)
    await asyncio.to_thread(pipe.start, "gateway")
    url = f"{pipe.gateway_url}/v1/jobs"
    ok = {"queue": "work", "payload": {}}
    cases: list[tuple[str, str, Any, dict[str, str] | None, bytes | None, int, str]] = [
        ("no key", url, ok, None, None, 401, "submit key"),
        ("wrong key", url, ok, {"Authorization": "Bearer nope"}, None, 401, "submit key"),
        (
            "an event write key",
            url,
            ok,
            {"Authorization": basic_auth(pipe.write_key)},
            None,
            401,
            "submit key",
        ),
        ("unknown queue", url, {"queue": "nope"}, BEARER, None, 404, "no queue named"),
        ("another queue's", url, {"queue": "other"}, BEARER, None, 403, "may not submit"),
        ("priority 3 of 3", url, {**ok, "priority": 3}, BEARER, None, 400, "out of range"),
        ("priority 10", url, {**ok, "priority": 10}, BEARER, None, 400, "priority"),
        ("priority as text", url, {**ok, "priority": "1"}, BEARER, None, 400, "priority"),
        ("negative delay", url, {**ok, "delay_ms": -1}, BEARER, None, 400, "delay_ms"),
        (
            "delay and run_at",
            url,
            {**ok, "delay_ms": 1, "run_at": "2030-01-01T00:00:00Z"},
            BEARER,
            None,
            400,
            "not both",
        ),
        ("naive run_at", url, {**ok, "run_at": "2030-01-01T00:00:00"}, BEARER, None, 400, "zone"),
        ("an unknown field", url, {**ok, "colour": "red"}, BEARER, None, 400, "colour"),
        ("oversized payload", url, {**ok, "payload": "x" * 2000}, BEARER, None, 413, "limit"),
        ("malformed JSON", url, None, BEARER, b'{"queue": ', 400, "not valid JSON"),
        ("a list body", url, [ok], BEARER, None, 400, "JSON object"),
        ("no queue", url, {"payload": 1}, BEARER, None, 400, "queue"),
        ("an empty batch", f"{url}/batch", {"jobs": []}, BEARER, None, 400, "at least one"),
        (
            "a batch with one bad job",
            f"{url}/batch",
            {"jobs": [ok, ok, {**ok, "priority": 7}]},
            BEARER,
            None,
            400,
            "jobs[2]",
        ),
        (
            "too many jobs",
            f"{url}/batch",
            {"jobs": [{"queue": "work"}] * 1001},
            BEARER,
            None,
            413,
            "over the limit",
        ),
    ]
    try:
        async with aiohttp.ClientSession() as session:
            for what, target, body, headers, raw, status, reason in cases:
                got, answer = await _post(session, target, body, headers, raw)
                assert (got, reason in answer.get("error", "")) == (status, True), (what, answer)
    finally:
        await asyncio.to_thread(pipe.stop)
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topics = [f"{prefix}.jobs.work.p{n}" for n in range(3)]
    topics += [f"{prefix}.jobs.other.p{n}" for n in range(10)]
    assert set((await asyncio.to_thread(_high_watermarks, kafka, topics)).values()) == {0}
