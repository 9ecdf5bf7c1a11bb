"""Delivery reliability on the real broker: retry tiers, due times across a restart,
poison records, an unavailable DLQ, order-preserving retries."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from core.admin import admin_client
from core.settings import KafkaSettings
from ops.processes import BackgroundProcess
from ops.traffic import sample_events, send_batches
from schemas.codec import event_codec
from tests.configs import Configs
from tests.conftest import scaled
from tests.pipeline import (
    Pipeline,
    envelope_records,
    free_port,
    group_lag,
    http_text,
    pipeline_with_topics,
    produce,
    read_records,
    until,
    webhook_receiver,
)

pytestmark = pytest.mark.integration
CODEC = event_codec(logical_types=False)


def _config(port: int, retry: dict[str, Any]) -> str:
    """A webhook on `port` with this retry policy and a breaker that stays closed."""
    configs = Configs()
    return configs.text(
        configs.webhook(
            f"http://127.0.0.1:{port}/hook",
            retry=retry,
            timeout_s=2,
            breaker={"failures": 1000, "cooldown_s": 1},
        )
    )


def _kafka(pipe: Pipeline) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=pipe.bootstrap, topic_prefix=pipe.prefix)


def _metric(port: int, name: str) -> float:
    text = http_text(f"http://127.0.0.1:{port}/metrics")
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in the delivery process's metrics"
    return float(found.group(1))


async def test_retries_come_due_on_time_across_a_restart(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    count = scaled(1200)
    fail_first: dict[str, int] = {}
    arrivals: dict[tuple[str, int], list[float]] = defaultdict(list)
    delivered: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        mid, attempt = body["messageId"], int(request.headers["X-Sluice-Attempt"])
        arrivals[(mid, attempt)].append(time.time())
        if attempt <= fail_first.get(mid, 0):
            return web.Response(status=503)
        delivered.add(mid)
        return web.Response(status=200)

    pipe = pipeline_with_topics(
        tmp_path, broker, prefix, _config(port, {"tiers": ["1s", "3s"], "max_attempts": 4})
    )
    kafka = _kafka(pipe)
    second_port = free_port()
    second = BackgroundProcess("deliver-2", pipe.root / "run")
    messages = sample_events(count, users=100, seed=3)
    for i, m in enumerate(messages):
        fail_first[m["messageId"]] = (0, 0, 1, 0, 2, 1, 0, 3)[i % 8]
    records = envelope_records(messages)
    topics = [f"{prefix}.dest.hook", f"{prefix}.dest.hook.retry.1s", f"{prefix}.dest.hook.retry.3s"]
    async with webhook_receiver(port, hook):
        # Two delivery processes share the partitions; one is restarted half way.
        await asyncio.to_thread(pipe.start, "deliver")
        second.start(["deliver"], {**pipe.env, "SLUICE_DELIVERY_PORT": str(second_port)})
        try:
            # About 100 events a second for 12 s.
            for i in range(0, count, 50):
                await asyncio.to_thread(produce, kafka, topics[0], records[i : i + 50])
                if i == count // 2:
                    await asyncio.to_thread(pipe.stop, "deliver")
                    await asyncio.to_thread(pipe.start, "deliver")
                await asyncio.sleep(0.5)
            await until(lambda: len(delivered) == count, 120, "every event delivered")
            await until(
                lambda: group_lag(kafka, f"{prefix}-delivery-hook", topics) == 0,
                30,
                "the consumer lag drained",
            )
            paused = [
                await asyncio.to_thread(_metric, p, "sluice_delivery_paused_partitions")
                for p in (pipe.delivery_port, second_port)
            ]
        finally:
            second.stop()
            await asyncio.to_thread(pipe.stop)

    assert paused == [0, 0]
    lateness = []
    for tier in ("1s", "3s"):
        for msg in await asyncio.to_thread(read_records, kafka, f"{prefix}.dest.hook.retry.{tier}"):
            h = {k: v.decode() for k, v in msg.headers()}
            mid = CODEC.decode(msg.value())["event_id"]
            due = int(h["sluice.retry.due"]) / 1000
            tried = arrivals[(mid, int(h["sluice.attempts"]) + 1)]
            assert tried, f"{mid} was never retried after attempt {h['sluice.attempts']}"
            # No retry earlier than its due time (a restart may repeat one, never early).
            assert min(tried) >= due - 0.001, f"{mid} retried {due - min(tried):.3f}s early"
            lateness.append(min(tried) - due)
    expected = sum(min(fail_first[m["messageId"]], 3) for m in messages)
    assert len(lateness) >= expected
    lateness.sort()
    p99 = lateness[math.ceil(len(lateness) * 0.99) - 1]
    assert p99 <= 2.0, f"p99 lateness {p99:.2f}s"


async def test_a_poison_record_every_thousand_lands_in_the_dlq_once_and_the_lag_drains(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    count = scaled(5000)
    delivered: dict[str, int] = defaultdict(int)

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body.get("properties", {}).get("poison"):
            return web.Response(status=400, text="cannot take this one")
        delivered[body["messageId"]] += 1
        return web.Response(status=200)

    pipe = pipeline_with_topics(
        tmp_path, broker, prefix, _config(port, {"tiers": ["1s"], "max_attempts": 2})
    )
    kafka = _kafka(pipe)
    topic = f"{prefix}.dest.hook"
    messages = sample_events(count, seed=11)
    records: list[tuple[bytes | None, bytes, Any]] = list(envelope_records(messages))
    poison: dict[int, str] = {}
    for i in range(999, count, 1000):
        if (i // 1000) % 2:
            records[i] = (records[i][0], b"\x00\x00\x00\x00\x01 not an envelope %d" % i, None)
            poison[i] = "SchemaError"
        else:
            messages[i]["properties"] = {"poison": True}
            records[i] = envelope_records([messages[i]])[0]
            poison[i] = "DeliveryRejected"
    good = {m["messageId"] for i, m in enumerate(messages) if i not in poison}
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        await asyncio.to_thread(produce, kafka, topic, records)
        await until(lambda: set(delivered) == good, 120, "every good event delivered")
        await until(
            lambda: group_lag(kafka, f"{prefix}-delivery-hook", [topic, f"{topic}.retry.1s"]) == 0,
            30,
            "the consumer lag drained",
        )
        await asyncio.to_thread(pipe.stop)

    assert set(delivered.values()) == {1}
    # Where each poison record sits on the destination topic, by its value.
    placed = {
        m.value(): (m.partition(), m.offset(), m.timestamp()[1])
        for m in await asyncio.to_thread(read_records, kafka, topic)
    }
    dead = await asyncio.to_thread(read_records, kafka, f"{topic}.dlq")
    assert sorted(m.value() for m in dead) == sorted(records[i][1] for i in poison)
    for msg in dead:
        h = {k: v.decode() for k, v in msg.headers()}
        partition, offset, timestamp = placed[msg.value()]
        assert h["sluice.original.topic"] == topic
        assert (h["sluice.original.partition"], h["sluice.original.offset"]) == (
            str(partition),
            str(offset),
        )
        assert h["sluice.original.timestamp"] == str(timestamp)
        assert h["sluice.destination"] == "hook"
        first, last = int(h["sluice.first.failure"]), int(h["sluice.last.failure"])
        assert timestamp <= first <= last
        if h["sluice.error.class"] == "SchemaError":
            assert (h["sluice.stage"], h["sluice.attempts"]) == ("decode", "0")
        else:
            assert h["sluice.error.class"] == "DeliveryRejected"
            assert h["sluice.stage"] == "delivery"
            assert h["sluice.attempts"] == "1"
            assert h["sluice.error.message"] == "HTTP 400: cannot take this one"
    assert sorted(
        {k: v.decode() for k, v in m.headers()}["sluice.error.class"] for m in dead
    ) == sorted(poison.values())


async def test_an_unavailable_dlq_holds_the_source_offset_and_loses_nothing(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    delivered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body.get("properties", {}).get("poison"):
            return web.Response(status=422, text="no")
        delivered.append(body["messageId"])
        return web.Response(status=200)

    pipe = pipeline_with_topics(tmp_path, broker, prefix, _config(port, {"tiers": ["1s"]}))
    kafka = _kafka(pipe)
    topic, group = f"{prefix}.dest.hook", f"{prefix}-delivery-hook"
    messages = sample_events(101, seed=12)
    messages[50]["properties"] = {"poison": True}
    before, after = [m["messageId"] for m in messages[:50]], [m["messageId"] for m in messages[51:]]
    # The DLQ refuses every write: its records are larger than it accepts.
    await asyncio.to_thread(_set_topic_config, kafka, f"{topic}.dlq", "max.message.bytes", "64")
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        # Everything in partition 0, in order: the poison record is offset 50.
        await asyncio.to_thread(produce, kafka, topic, envelope_records(messages), 0)
        await until(lambda: delivered == before, 60, "the records before the poison delivered")
        for _ in range(8):
            await asyncio.sleep(1)
            assert await asyncio.to_thread(_committed, kafka, group, topic, 0) <= 50
        assert delivered == before
        assert not await asyncio.to_thread(read_records, kafka, f"{topic}.dlq")

        await asyncio.to_thread(
            _set_topic_config, kafka, f"{topic}.dlq", "max.message.bytes", "1048588"
        )
        await until(lambda: delivered == before + after, 90, "the rest delivered after recovery")
        await until(lambda: _committed(kafka, group, topic, 0) == 101, 30, "the offset committed")
        await asyncio.to_thread(pipe.stop)
    dead = await asyncio.to_thread(read_records, kafka, f"{topic}.dlq")
    assert [CODEC.decode(m.value())["event_id"] for m in dead] == [messages[50]["messageId"]]


def _set_topic_config(kafka: KafkaSettings, topic: str, name: str, value: str) -> None:
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)],
    )
    admin = admin_client(kafka)  # kept alive until the answer is in
    admin.incremental_alter_configs([resource])[resource].result(30)


def _committed(kafka: KafkaSettings, group: str, topic: str, partition: int) -> int:
    consumer = Consumer(kafka.client_config() | {"group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


async def test_order_preserving_retries_keep_every_users_order_across_a_restart(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    users, per_user, max_attempts = 50, scaled(40), 3
    # Per event, what the receiver answers to its attempts (then 200): a pattern of 500s
    # (retried), 400 (fatal) and 500 forever (retries spent).
    rng = random.Random(5)
    plan: dict[str, list[int]] = {}
    arrived: dict[str, list[str]] = defaultdict(list)  # user -> delivered ids, in order
    requests: dict[str, int] = defaultdict(int)

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        mid = body["messageId"]
        requests[mid] += 1
        answers = plan[mid]
        status = answers[min(requests[mid], len(answers)) - 1] if answers else 200
        if status == 200:
            arrived[body["userId"]].append(mid)
        return web.Response(status=status)

    retry = {"tiers": ["1s", "2s"], "max_attempts": max_attempts, "preserve_order": True}
    pipe = pipeline_with_topics(tmp_path, broker, prefix, _config(port, retry))
    kafka = _kafka(pipe)
    rounds: list[list[dict[str, Any]]] = []
    sent: dict[str, list[str]] = defaultdict(list)
    for r in range(per_user):
        batch = []
        for u in range(users):
            mid = f"u{u}-e{r}"
            pick = rng.random()
            plan[mid] = (
                [500, 200]
                if pick < 0.10
                else [500, 500, 200]
                if pick < 0.15
                else [400]
                if pick < 0.18
                else [500] * 10
                if pick < 0.20
                else []
            )
            batch.append(
                {
                    "type": "track",
                    "event": "Step",
                    "userId": f"user-{u}",
                    "messageId": mid,
                    "properties": {"n": r},
                }
            )
            sent[f"user-{u}"].append(mid)
        rounds.append(batch)
    dead = {m for m, p in plan.items() if (p and p[0] == 400) or p == [500] * 10}
    good = set(plan) - dead
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "gateway", "worker", "deliver")
        try:
            # One request a round, one after the other: each user's events in order.
            for r, batch in enumerate(rounds):
                report = await send_batches(pipe.gateway_url, pipe.write_key, batch, users, 1)
                assert report.accepted == users
                if r == per_user // 2:
                    # The parked keys and held events survive a restart of the delivery.
                    await asyncio.to_thread(pipe.stop, "deliver")
                    await asyncio.to_thread(pipe.start, "deliver")
                await asyncio.sleep(0.1)
            await until(
                lambda: (
                    {m for ids in arrived.values() for m in ids} >= good
                    and len(_dlq_ids(kafka, prefix)) >= len(dead)
                ),
                120,
                "every event delivered or dead-lettered",
            )
            parked = await asyncio.to_thread(
                _metric, pipe.delivery_port, "sluice_retry_parked_keys"
            )
        finally:
            await asyncio.to_thread(pipe.stop)

    # Every user's deliveries in the order sent: no event overtook an earlier one.
    for user, ids in arrived.items():
        order = [sent[user].index(m) for m in ids]
        assert order == sorted(order), f"{user} out of order: {ids}"
        assert len(ids) == len(set(ids)), f"{user} got duplicates"
    assert {m for ids in arrived.values() for m in ids} == good
    assert sorted(_dlq_ids(kafka, prefix)) == sorted(dead)
    assert max(requests.values()) <= max_attempts
    assert parked == 0


def _dlq_ids(kafka: KafkaSettings, prefix: str) -> list[str]:
    return [
        CODEC.decode(m.value())["event_id"] for m in read_records(kafka, f"{prefix}.dest.hook.dlq")
    ]


async def test_a_graceful_stop_while_held_records_are_released_delivers_each_once(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    users, per_user = 8, 12
    requests: dict[str, int] = defaultdict(int)
    arrived: dict[str, list[str]] = defaultdict(list)  # user -> ids answered 200, in order
    in_flight = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal in_flight
        body = orjson.loads(await request.read())
        mid = body["messageId"]
        requests[mid] += 1
        if mid.endswith("-e0") and requests[mid] == 1:
            return web.Response(status=500)  # each user's first event parks its key
        # The receiver takes the event at once and answers slowly: a release is always
        # in the middle of a request when the stop comes.
        arrived[body["userId"]].append(mid)
        in_flight += 1
        try:
            await asyncio.sleep(0.3)
        finally:
            in_flight -= 1
        return web.Response(status=200)

    retry = {"tiers": ["1s"], "max_attempts": 5, "preserve_order": True}
    configs = Configs()
    # A timeout well above the slow answers: a request that timed out would be tried again
    # (at least once, as documented), which is not what this test is about.
    config = configs.text(
        configs.webhook(
            f"http://127.0.0.1:{port}/hook",
            retry=retry,
            timeout_s=15,
            breaker={"failures": 1000, "cooldown_s": 1},
        )
    )
    pipe = pipeline_with_topics(tmp_path, broker, prefix, config)
    kafka = _kafka(pipe)
    messages = [
        {"type": "track", "event": "Step", "userId": f"u{u}", "messageId": f"u{u}-e{r}"}
        for r in range(per_user)
        for u in range(users)
    ]
    expected = {f"u{u}": [f"u{u}-e{r}" for r in range(per_user)] for u in range(users)}
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            # One partition: every key's later events are held behind its first one, and
            # released together once the first ones are delivered from the tier.
            await asyncio.to_thread(
                produce, kafka, f"{prefix}.dest.hook", envelope_records(messages), 0
            )
            await until(
                lambda: in_flight >= users // 2 and sum(map(len, arrived.values())) > 2 * users,
                60,
                "held records being released",
            )
            # A graceful stop in the middle of the releases, and a start.
            await asyncio.to_thread(pipe.stop, "deliver")
            log = pipe.services["deliver"].log_file.read_text()
            assert "deliveries stopped" in log
            assert "delivery lane failed" not in log
            await asyncio.to_thread(pipe.start, "deliver")
            await until(
                lambda: all(len(arrived[u]) >= per_user for u in expected),
                60,
                "every event delivered",
            )
            await until(
                lambda: _metric(pipe.delivery_port, "sluice_retry_parked_keys") == 0,
                30,
                "no key parked",
            )
        finally:
            await asyncio.to_thread(pipe.stop)
    assert dict(arrived) == expected  # in order, each event once
    assert not _dlq_ids(kafka, prefix)
