"""The delivery process against hostile destinations and long waits, on the real broker:
absurd `Retry-After` values, a key parked behind a long retry, a long parked changelog,
a stalled destination loop."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from confluent_kafka import KafkaError, Producer

from core.settings import KafkaSettings
from ops.traffic import sample_events
from tests.configs import Configs
from tests.pipeline import (
    Pipeline,
    envelope_records,
    free_port,
    group_lag,
    pipeline_with_topics,
    produce,
    read_records,
    until,
    webhook_receiver,
)

pytestmark = pytest.mark.integration


def _pipeline(
    tmp_path: Path,
    broker: str,
    prefix: str,
    port: int,
    retry: dict[str, Any],
    timeout_s: float = 2,
) -> Pipeline:
    """A pipeline with a webhook on `port`, this retry policy and a breaker that stays closed."""
    configs = Configs()
    hook = configs.webhook(
        f"http://127.0.0.1:{port}/hook",
        retry=retry,
        timeout_s=timeout_s,
        breaker={"failures": 1000, "cooldown_s": 1},
    )
    return pipeline_with_topics(tmp_path, broker, prefix, configs.text(hook))


def _kafka(pipe: Pipeline) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=pipe.bootstrap, topic_prefix=pipe.prefix)


def _ready(pipe: Pipeline) -> tuple[int, dict[str, object]]:
    """The delivery process's `/ready`: status and body."""
    url = f"http://127.0.0.1:{pipe.delivery_port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


# What hostile or broken destinations send as Retry-After: non-finite, negative, absurdly
# large, dates far out or long past, garbage.
HOSTILE_RETRY_AFTER = [
    "inf",
    "Infinity",
    "-inf",
    "nan",
    "1e400",
    "-5",
    "99999999999",
    str(10**30),
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Fri, 31 Dec 99999 23:59:59 GMT",
    "soon, maybe",
    "",
]


async def test_absurd_retry_after_values_are_capped_and_every_record_is_delivered(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    per_header = 4
    messages = sample_events(len(HOSTILE_RETRY_AFTER) * per_header, users=40, seed=21)
    header_of = {
        m["messageId"]: HOSTILE_RETRY_AFTER[i % len(HOSTILE_RETRY_AFTER)]
        for i, m in enumerate(messages)
    }
    attempts: dict[str, list[float]] = defaultdict(list)
    delivered: dict[str, int] = defaultdict(int)

    async def hook(request: web.Request) -> web.Response:
        mid = orjson.loads(await request.read())["messageId"]
        attempts[mid].append(time.time())
        if len(attempts[mid]) == 1:
            status = 429 if len(mid) % 2 else 503
            return web.Response(status=status, headers={"Retry-After": header_of[mid]})
        delivered[mid] += 1
        return web.Response(status=200)

    # The policy caps a Retry-After at 3 s; the tiers are 1 s and 2 s.
    retry = {"tiers": ["1s", "2s"], "max_attempts": 5, "max_retry_after_s": 3}
    pipe = _pipeline(tmp_path, broker, prefix, port, retry)
    kafka = _kafka(pipe)
    topic = f"{prefix}.dest.hook"
    tiers = [f"{topic}.retry.1s", f"{topic}.retry.2s"]
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            await asyncio.to_thread(produce, kafka, topic, envelope_records(messages))
            await until(lambda: len(delivered) == len(messages), 90, "every record delivered")
            await until(
                lambda: group_lag(kafka, f"{prefix}-delivery-hook", [topic, *tiers]) == 0,
                30,
                "the consumer lag drained",
            )
            # The process is alive, and ready.
            assert pipe.services["deliver"].pid() is not None
            status, body = await asyncio.to_thread(_ready, pipe)
            assert status == 200, body
        finally:
            await asyncio.to_thread(pipe.stop)

    assert set(delivered.values()) == {1}
    assert all(len(times) == 2 for times in attempts.values())
    retried = [m for t in tiers for m in await asyncio.to_thread(read_records, kafka, t)]
    assert len(retried) == len(messages)
    assert not await asyncio.to_thread(read_records, kafka, f"{topic}.dlq")
    for msg in retried:
        h = {k: v.decode() for k, v in msg.headers()}
        wait_s = (int(h["sluice.retry.due"]) - int(h["sluice.last.failure"])) / 1000
        # Within the cap (plus the policy's jitter), never negative.
        assert 1.0 <= wait_s <= 3 * 1.1 + 0.01, h


def _metric(pipe: Pipeline, name: str) -> float:
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{pipe.delivery_port}/metrics", timeout=10
    ).read()
    for line in text.decode().splitlines():
        if line.startswith(name) and 'destination="hook"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the delivery process's metrics")


async def test_a_stalled_destination_loop_fails_ready_with_the_reason_and_progress_clears_it(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    answer = asyncio.Event()
    delivered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        # The first request hangs (a destination that accepts the connection and never
        # answers, within a 60 s timeout) until the test lets it go.
        await answer.wait()
        delivered.append(orjson.loads(await request.read())["messageId"])
        return web.Response(status=200)

    pipe = _pipeline(tmp_path, broker, prefix, port, {"tiers": ["1s"]}, timeout_s=60)
    pipe.env["SLUICE_DELIVERY_STALL_AFTER_S"] = "3"
    kafka = _kafka(pipe)
    messages = sample_events(5, users=1, seed=4)
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            # Ready once it has read the config topic to its end (a moment after /health).
            await until(lambda: _ready(pipe)[0] == 200, 30, "/ready green at the start")
            await asyncio.to_thread(
                produce, kafka, f"{prefix}.dest.hook", envelope_records(messages), 0
            )

            async def not_ready() -> tuple[int, dict[str, object]]:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    status, body = await asyncio.to_thread(_ready, pipe)
                    if status != 200:
                        return status, body
                    await asyncio.sleep(0.5)
                raise AssertionError("/ready never failed while the loop was stuck")

            status, body = await not_ready()
            assert status == 503
            problems = body["problems"]
            assert isinstance(problems, dict)
            assert "stalled" in problems["hook"]
            assert "records waiting" in problems["hook"]
            stalled_for = await asyncio.to_thread(
                _metric, pipe, "sluice_delivery_seconds_since_progress"
            )
            assert stalled_for > 3
            assert delivered == []

            # The destination answers: records move again and /ready is green.
            answer.set()
            await until(lambda: len(delivered) == len(messages), 60, "every record delivered")
            await until(lambda: _ready(pipe)[0] == 200, 30, "/ready green again")
            # The loop samples its waiting records every half second: the gauge follows.
            await until(
                lambda: _metric(pipe, "sluice_delivery_seconds_since_progress") == 0,
                10,
                "the stall gauge back at 0",
            )
        finally:
            answer.set()
            await asyncio.to_thread(pipe.stop)
    assert sorted(delivered) == sorted(m["messageId"] for m in messages)


async def test_records_held_behind_a_parked_key_stay_within_the_bound_and_go_out_in_order(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    bound, hot_count = 50, 400
    failing = True
    arrived: dict[str, list[str]] = defaultdict(list)

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body["messageId"] == "hot-0" and failing:
            return web.Response(status=503)
        arrived[body["userId"]].append(body["messageId"])
        return web.Response(status=200)

    retry = {"tiers": ["1s"], "max_attempts": 1000, "preserve_order": True}
    pipe = _pipeline(tmp_path, broker, prefix, port, retry)
    pipe.env["SLUICE_DELIVERY_MAX_HELD_RECORDS"] = str(bound)
    kafka = _kafka(pipe)
    topic = f"{prefix}.dest.hook"
    hot = [
        {"type": "track", "event": "Step", "userId": "hot", "messageId": f"hot-{i}"}
        for i in range(hot_count)
    ]
    # Other keys behind the hot one in its partition, and keys in the other partitions.
    behind = [
        {"type": "track", "event": "Step", "userId": f"b{i}", "messageId": f"b-{i}"}
        for i in range(20)
    ]
    others = [
        {"type": "track", "event": "Step", "userId": f"o{i}", "messageId": f"o-{i}"}
        for i in range(60)
    ]
    held_seen: list[float] = []
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            await asyncio.to_thread(produce, kafka, topic, envelope_records(hot + behind), 0)
            for p in (1, 2, 3):
                await asyncio.to_thread(
                    produce, kafka, topic, envelope_records(others[(p - 1) * 20 : p * 20]), p
                )
            # The head keeps failing: the partition fills up to the bound and is paused
            # there, while the other partitions are delivered.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                held_seen.append(
                    await asyncio.to_thread(_metric, pipe, "sluice_retry_held_records")
                )
                if held_seen[-1] >= bound and len(held_seen) > 20:
                    break
                await asyncio.sleep(0.2)
            for _ in range(15):  # and stays there
                await asyncio.sleep(0.2)
                held_seen.append(
                    await asyncio.to_thread(_metric, pipe, "sluice_retry_held_records")
                )
            assert max(held_seen) == bound, held_seen
            assert held_seen[-1] == bound
            assert await asyncio.to_thread(_metric, pipe, "sluice_delivery_paused_partitions") >= 1
            await until(
                lambda: sum(len(arrived[f"o{i}"]) for i in range(60)) == 60,
                60,
                "the other partitions delivered meanwhile",
            )
            assert arrived["hot"] == []
            status, body = await asyncio.to_thread(_ready, pipe)
            assert status == 200, body  # waiting on purpose is not a stall

            # A restart while the partition waits at the bound: the process stops cleanly
            # (the waiting lane lets go), and the next one restores the held records and
            # stops at the bound again.
            await asyncio.to_thread(pipe.stop, "deliver")
            assert "deliveries stopped" in pipe.services["deliver"].log_file.read_text()
            await asyncio.to_thread(pipe.start, "deliver")
            await until(
                lambda: _metric(pipe, "sluice_retry_held_records") == bound,
                60,
                "the held records restored, at the bound",
            )
            assert arrived["hot"] == []

            failing = False
            await until(
                lambda: (
                    len(arrived["hot"]) == hot_count and all(arrived[f"b{i}"] for i in range(20))
                ),
                120,
                "everything delivered after the head",
            )
            await until(lambda: _metric(pipe, "sluice_retry_held_records") == 0, 30, "nothing held")
        finally:
            await asyncio.to_thread(pipe.stop)
    assert arrived["hot"] == [f"hot-{i}" for i in range(hot_count)]
    assert all(arrived[f"b{i}"] == [f"b-{i}"] for i in range(20))


def _produce_fast(kafka: KafkaSettings, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
    """Produce many records to partition 0 quickly (batched, compressed), all confirmed."""
    producer = Producer(
        kafka.client_config()
        | {"linger.ms": 50, "batch.size": 1_000_000, "compression.type": "lz4", "acks": "all"}
    )
    failed: list[str] = []

    def report(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failed.append(err.str())

    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, partition=0, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0
    assert not failed, failed[:1]


def _parked_changelog(
    keys: int, held_per_key: int, records: list[tuple[bytes, bytes, None]], rewrites: int
) -> Iterator[tuple[bytes, bytes]]:
    """A parked changelog as an earlier owner left it, not compacted yet: `rewrites` states
    of keys that went through many attempts, then every key's head resolved and its held
    records not yet released (so the next owner releases them after restoring)."""
    import base64  # noqa: PLC0415

    for i in range(rewrites):
        key = f"test-src:parked-{i % keys}".encode()
        yield b"k:" + key, orjson.dumps({"head": f"0:{i}", "attempts": 1 + i // keys})
    seq = 0
    for k in range(keys):
        key = f"test-src:parked-{k}".encode()
        yield b"k:" + key, orjson.dumps({"head": None, "attempts": 0})
        for h in range(held_per_key):
            value = records[k * held_per_key + h][1]
            body = {
                "ref": f"0:{seq}",
                "value": base64.b64encode(value).decode(),
                "headers": [],
                "ts": int(time.time() * 1000),
            }
            yield b"h:" + seq.to_bytes(8, "big") + key, orjson.dumps(body)
            seq += 1


async def test_a_long_parked_changelog_is_restored_beside_the_poll_loop_without_a_rebalance(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    # Thousands of parked keys and held records behind six million superseded states: a
    # read of well over 30 s (it used to time out the assignment into a restart loop).
    keys, held_per_key, rewrites = 1000, 5, 6_000_000
    arrived: dict[str, list[str]] = defaultdict(list)
    first_at: dict[str, float] = {}

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        user = body["userId"]
        kind = "parked" if user.startswith("parked-") else "fresh"
        first_at.setdefault(kind, time.monotonic())
        arrived[user].append(body["messageId"])
        return web.Response(status=200)

    pipe = _pipeline(tmp_path, broker, prefix, port, {"tiers": ["1s"], "preserve_order": True})
    # A short poll interval: a restore that held up polling would cost the assignment.
    pipe.env["SLUICE_DELIVERY_MAX_POLL_INTERVAL_MS"] = "10000"
    kafka = _kafka(pipe)
    topic = f"{prefix}.dest.hook"
    held = [
        {"type": "track", "event": "Step", "userId": f"parked-{k}", "messageId": f"p{k}-{h}"}
        for k in range(keys)
        for h in range(held_per_key)
    ]
    fresh = [
        {"type": "track", "event": "Step", "userId": f"fresh-{i}", "messageId": f"f-{i}"}
        for i in range(30)
    ]
    changelog = _parked_changelog(keys, held_per_key, envelope_records(held), rewrites)
    await asyncio.to_thread(_produce_fast, kafka, f"{topic}.parked", changelog)
    for p in (1, 2, 3):
        await asyncio.to_thread(
            produce, kafka, topic, envelope_records(fresh[(p - 1) * 10 : p * 10]), p
        )
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            await until(
                lambda: (
                    sum(len(arrived[f"parked-{k}"]) for k in range(keys)) == len(held)
                    and all(arrived[f"fresh-{i}"] for i in range(30))
                ),
                240,
                "every held and fresh record delivered",
            )
            status, body = await asyncio.to_thread(_ready, pipe)
            assert status == 200, body
            await until(
                lambda: (
                    _metric(pipe, "sluice_retry_held_records") == 0
                    and _metric(pipe, "sluice_retry_parked_keys") == 0
                ),
                30,
                "no key parked, nothing held",
            )
        finally:
            await asyncio.to_thread(pipe.stop)

    log_text = pipe.services["deliver"].log_file.read_text()
    # One assignment, kept: no rebalance while the changelog was read.
    assert log_text.count("partitions assigned") == 1, log_text[-3000:]
    assert "restoring parked keys failed" not in log_text
    # The other partitions did not wait for partition 0's restore.
    assert first_at["fresh"] < first_at["parked"]
    for k in range(keys):
        assert arrived[f"parked-{k}"] == [f"p{k}-{h}" for h in range(held_per_key)]
    assert all(arrived[f"fresh-{i}"] == [f"f-{i}"] for i in range(30))


async def test_a_damaged_parked_changelog_record_is_skipped_and_the_rest_restored(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    keys, held_per_key = 20, 3
    arrived: dict[str, list[str]] = defaultdict(list)

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        arrived[body["userId"]].append(body["messageId"])
        return web.Response(status=200)

    pipe = _pipeline(tmp_path, broker, prefix, port, {"tiers": ["1s"], "preserve_order": True})
    kafka = _kafka(pipe)
    topic = f"{prefix}.dest.hook"
    held = [
        {"type": "track", "event": "Step", "userId": f"parked-{k}", "messageId": f"p{k}-{h}"}
        for k in range(keys)
        for h in range(held_per_key)
    ]
    junk = [
        (b"k:test-src:junk-1", b"not json"),
        (b"k:test-src:junk-2", orjson.dumps({"head": 7, "attempts": "many"})),
        (b"k:test-src:junk-3", orjson.dumps(["head"])),
        (b"h:\x00\x00\x00\x00\x00\x00\x99\x99test-src:junk-4", orjson.dumps({"ref": "x"})),
        (
            b"h:\x00\x00\x00\x00\x00\x00\x99\x9atest-src:junk-5",
            orjson.dumps({"ref": "nope", "value": "AA==", "headers": [], "ts": 1}),
        ),
        (b"h:short", b"{}"),
        (b"zzz", b"whatever"),
    ]
    good = list(_parked_changelog(keys, held_per_key, envelope_records(held), 0))
    # The damaged records in the middle of the good ones.
    changelog = good[: len(good) // 2] + junk + good[len(good) // 2 :]
    await asyncio.to_thread(_produce_fast, kafka, f"{topic}.parked", changelog)
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            await until(
                lambda: sum(len(arrived[f"parked-{k}"]) for k in range(keys)) == len(held),
                60,
                "every held record delivered",
            )
            # The partition flows again: a new record on it is delivered.
            await asyncio.to_thread(
                produce,
                kafka,
                topic,
                envelope_records(
                    [{"type": "track", "event": "New", "userId": "n", "messageId": "n-0"}]
                ),
                0,
            )
            await until(lambda: arrived["n"] == ["n-0"], 60, "a new record delivered")
            status, body = await asyncio.to_thread(_ready, pipe)
            assert status == 200, body
        finally:
            await asyncio.to_thread(pipe.stop)
    log_text = pipe.services["deliver"].log_file.read_text()
    assert log_text.count("parked changelog record skipped") == len(junk)
    for k in range(keys):
        assert arrived[f"parked-{k}"] == [f"p{k}-{h}" for h in range(held_per_key)]
