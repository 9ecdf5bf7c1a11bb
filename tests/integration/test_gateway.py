"""The gateway over real HTTP against the real broker: statuses, bodies, and what lands on topics."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Consumer

from core.admin import apply_topics
from core.settings import GatewaySettings, KafkaSettings
from core.topics import Topics, required_topics
from gateway.app import create_app
from gateway.envelope import in_time_range
from gateway.numbers import holdable
from ops.traffic import basic_auth
from schemas.codec import event_codec
from tests.configs import Configs

pytestmark = pytest.mark.integration

_CONFIGS = Configs()
CONFIG = _CONFIGS.model(
    _CONFIGS.warehouse("wh", sources=["web"]),
    sources=[
        _CONFIGS.source("web", keys=["good-key"]),
        _CONFIGS.source("paused", keys=["off-key"], enabled=False),
        _CONFIGS.source("slow", keys=["slow-key"], rate_limit={"events_per_s": 2, "burst": 5}),
    ],
)
AUTH = {"Authorization": basic_auth("good-key")}


@pytest.fixture
async def client(kafka: KafkaSettings) -> AsyncIterator[TestClient[Any, Any]]:
    apply_topics(required_topics(CONFIG, kafka), kafka)
    settings = GatewaySettings(max_request_bytes=64 * 1024, max_event_bytes=4096)
    async with TestClient(TestServer(create_app(settings, kafka, CONFIG))) as test_client:
        yield test_client


def read_topic(kafka: KafkaSettings, topic: str, expected: int, timeout: float = 20) -> list[Any]:
    """Every record of `topic` (waits until `expected` arrived or time runs out)."""
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"{topic}-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    try:
        import time  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(m for m in consumer.consume(100, timeout=0.5) if m.error() is None)
        # Anything beyond `expected` would be a duplicate: look a little longer.
        records.extend(m for m in consumer.consume(100, timeout=1.0) if m.error() is None)
    finally:
        consumer.close()
    return records


async def test_batch_accepts_valid_reports_invalid_and_records_rejections(
    client: TestClient[Any, Any], kafka: KafkaSettings
) -> None:
    batch = [
        {"type": "track", "event": "Signed Up", "userId": "u1", "messageId": "m1"},
        {"type": "track", "userId": "u1"},
        {"type": "identify", "anonymousId": "a9", "messageId": "m2", "traits": {"plan": "pro"}},
    ]
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "accepted": 2,
        "rejected": [{"index": 1, "reason": "track events need an event name"}],
    }

    topics = Topics(kafka.topic_prefix)
    landed = read_topic(kafka, topics.ingest, 2)
    assert len(landed) == 2
    by_id = {event_codec().decode(m.value())["event_id"]: m for m in landed}
    assert by_id["m1"].key() == b"web:u1"
    assert by_id["m2"].key() == b"web:a9"
    rejected = read_topic(kafka, topics.rejected, 1)
    assert len(rejected) == 1
    headers = dict(rejected[0].headers())
    assert headers["sluice.reason"] == b"track events need an event name"
    assert headers["sluice.stage"] == b"gateway"
    assert orjson.loads(rejected[0].value()) == batch[1]


async def test_single_event_routes_and_write_key_in_body(
    client: TestClient[Any, Any], kafka: KafkaSettings
) -> None:
    resp = await client.post(
        "/v1/track", json={"writeKey": "good-key", "userId": "u", "event": "E"}
    )
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1
    [record] = read_topic(kafka, Topics(kafka.topic_prefix).ingest, 1)
    assert event_codec().decode(record.value())["type"] == "track"


@pytest.mark.parametrize(
    ("headers", "body", "status", "reason"),
    [
        ({}, b'{"batch": []}', 401, "write key"),
        ({"Authorization": basic_auth("bad")}, b'{"batch": []}', 401, "write key"),
        ({"Authorization": basic_auth("off-key")}, b'{"batch": []}', 401, "write key"),
        (AUTH, b'{"batch": [', 400, "not valid JSON"),
        (AUTH, b'{"batch": "x"}', 400, "'batch' array"),
        (AUTH, b'{"batch": [{"type": "track"}]}', 400, ""),
        (AUTH, b"[" * 70_000, 413, "request body exceeds"),
        (
            AUTH,
            b'{"batch": [{"type": "track", "userId": "u", "event": "\xff"}]}',
            400,
            "not valid JSON",
        ),
        (
            AUTH,
            b'{"batch": [{"properties": ' + b'{"a": ' * 40 + b"1" + b"}" * 41 + b"]}",
            400,
            "deeper than 32",
        ),
        (AUTH, b'{"batch": [], "sentAt": "soon"}', 400, "sentAt is not an ISO-8601"),
        (AUTH, b'{"batch": [], "sentAt": "1899-12-31T23:59:59Z"}', 400, "sentAt is outside"),
        (AUTH, b'{"batch": [], "sentAt": 123456789012345678901234567890}', 400, "sentAt: integer"),
    ],
)
async def test_bad_requests_get_their_status_and_produce_nothing(
    client: TestClient[Any, Any],
    kafka: KafkaSettings,
    headers: dict[str, str],
    body: bytes,
    status: int,
    reason: str,
) -> None:
    resp = await client.post("/v1/batch", data=body, headers=headers)
    assert resp.status == status
    assert reason in (await resp.json()).get("error", "")
    assert read_topic(kafka, Topics(kafka.topic_prefix).ingest, 0, timeout=1) == []


async def test_gzip_bomb_is_refused_without_inflating_it(client: TestClient[Any, Any]) -> None:
    bomb = gzip.compress(b'{"batch": [' + b" " * 50_000_000 + b"]}")
    assert len(bomb) < 64 * 1024
    resp = await client.post("/v1/batch", data=bomb, headers={**AUTH, "Content-Encoding": "gzip"})
    assert resp.status == 413
    assert "request body exceeds 65536 bytes" in (await resp.json())["error"]


async def test_gzip_body_is_accepted(client: TestClient[Any, Any]) -> None:
    body = gzip.compress(orjson.dumps({"batch": [{"type": "page", "userId": "u", "name": "Home"}]}))
    resp = await client.post("/v1/batch", data=body, headers={**AUTH, "Content-Encoding": "gzip"})
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1


async def test_health_ready_and_metrics(client: TestClient[Any, Any], kafka: KafkaSettings) -> None:
    assert (await client.get("/health")).status == 200
    # Ready once the config topic has been read to its end; until then 503, naming it.
    config = Topics(kafka.topic_prefix).config
    for _ in range(300):
        resp = await client.get("/ready")
        if resp.status == 200:
            break
        assert resp.status == 503
        # (or another topic it reads to its end too: job statuses, the workflow catalog and
        # runs; a follower that finds a partition without its leader yet says so and retries)
        reason = (await resp.json())["reason"]
        topics = Topics(kafka.topic_prefix)
        read = (config, topics.jobs_status, topics.workflows_catalog, topics.workflows_runs)
        assert any(name in reason for name in read), reason
        await asyncio.sleep(0.1)
    assert resp.status == 200
    await client.post("/v1/track", json={"userId": "u", "event": "E"}, headers=AUTH)
    text = await (await client.get("/metrics")).text()
    assert 'sluice_gateway_events_total{outcome="accepted",source="web"} 1.0' in text


async def test_webhook_wraps_any_json_with_key_in_query(
    client: TestClient[Any, Any], kafka: KafkaSettings
) -> None:
    payload = {"action": "opened", "number": 7, "nested": {"ok": True}}
    resp = await client.post(
        "/v1/webhook?writeKey=good-key", json=payload, headers={"X-Message-Id": "hook-1"}
    )
    assert resp.status == 200
    [record] = read_topic(kafka, Topics(kafka.topic_prefix).ingest, 1)
    event = event_codec().decode(record.value())
    assert (event["type"], event["event_id"], event["source_id"]) == ("webhook", "hook-1", "web")
    assert orjson.loads(event["properties"]) == payload
    assert record.key() == b"web:hook-1"


async def test_batch_sent_at_corrects_every_message(
    client: TestClient[Any, Any], kafka: KafkaSettings
) -> None:
    batch = {
        "sentAt": "2030-01-01T00:00:10.000Z",
        "batch": [
            {"type": "track", "event": "E", "userId": "u", "timestamp": "2030-01-01T00:00:00.000Z"}
        ],
    }
    assert (await client.post("/v1/batch", json=batch, headers=AUTH)).status == 200
    [record] = read_topic(kafka, Topics(kafka.topic_prefix).ingest, 1)
    event = event_codec().decode(record.value())
    # The client's clock ran 10 s between the event and sending: the event happened 10 s
    # before the gateway received it, whatever the client's clock said.
    assert (event["received_at"] - event["timestamp"]).total_seconds() == 10


async def test_rate_limited_source_gets_429_and_produces_nothing_more(
    client: TestClient[Any, Any], kafka: KafkaSettings
) -> None:
    slow = {"Authorization": basic_auth("slow-key")}
    batch = {"batch": [{"type": "track", "event": "E", "userId": "u"}] * 5}
    assert (await client.post("/v1/batch", json=batch, headers=slow)).status == 200
    limited = await client.post("/v1/batch", json=batch, headers=slow)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit" in (await limited.json())["error"]
    too_big = await client.post("/v1/batch", json={"batch": batch["batch"] * 2}, headers=slow)
    assert too_big.status == 429
    assert "exceed the source's burst of 5" in (await too_big.json())["error"]
    assert len(read_topic(kafka, Topics(kafka.topic_prefix).ingest, 5)) == 5


@pytest.mark.parametrize(
    "target",
    [
        ("/v1/batch", {"Authorization": basic_auth("bad")}),
        ("/v1/batch?writeKey=bad", {}),
        ("/v1/webhook?writeKey=bad", {}),
        ("/v1/track", {"Authorization": basic_auth("off-key")}),
    ],
)
async def test_a_bad_key_in_header_or_url_gets_401_before_the_body_is_sent(
    client: TestClient[Any, Any], kafka: KafkaSettings, target: tuple[str, dict[str, str]]
) -> None:
    path, headers = target
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = [f"POST {path} HTTP/1.1", f"Host: {client.host}", "Content-Type: application/json"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head.append("Content-Length: 60000")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    await writer.drain()
    # Not a byte of the body is sent: the answer must come from the head alone.
    status = await asyncio.wait_for(reader.readline(), timeout=5)
    assert status.startswith(b"HTTP/1.1 401"), status
    writer.close()
    assert read_topic(kafka, Topics(kafka.topic_prefix).ingest, 0, timeout=1) == []


async def test_a_key_in_the_body_still_works_with_no_key_in_header_or_url(
    client: TestClient[Any, Any],
) -> None:
    body = {"writeKey": "good-key", "batch": [{"type": "track", "event": "E", "userId": "u"}]}
    resp = await client.post("/v1/batch", json=body)
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1
    bad = await client.post("/v1/batch", json={**body, "writeKey": "bad"})
    assert bad.status == 401


GOOD = (
    b'{"type": "track", "event": "Fine", "userId": "u", "properties": {"n": 9223372036854775807}}'
)
HOSTILE = [
    (b'{"type": "track", "event": "E", "userId": "u", "properties": {"n": 1e999}}', "overflows"),
    (b'{"type": "track", "event": "E", "userId": "u", "properties": {"n": [-1e999]}}', "overflows"),
    (
        b'{"type": "track", "event": "E", "userId": "u", "properties": {"n": 123456789012345678901234567890}}',
        "integer 123456789012345678901234567890 is out of range",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u", "properties": {"n": 9223372036854775808}}',
        "does not fit a signed 64-bit integer",
    ),
    (
        b'{"type": "identify", "userId": "u", "traits": {"n": 18446744073709551615}}',
        "traits: integer",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u", "context": {"a": {"n": -9223372036854775809}}}',
        "context: integer",
    ),
    (
        b'{"type": "track", "event": "E", "userId": 123456789012345678901234567890}',
        "userId: integer",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u", "messageId": 18446744073709551615}',
        "messageId: integer",
    ),
    (b'{"type": "track", "event": "E", "userId": "u", "timestamp": -1e20}', "timestamp is outside"),
    (b'{"type": "track", "event": "E", "userId": "u", "timestamp": 1e20}', "timestamp is outside"),
    (
        b'{"type": "track", "event": "E", "userId": "u", "timestamp": 123456789012345678901234567890}',
        "timestamp: integer",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u", "timestamp": "0001-01-01T00:00:00.000Z"}',
        "timestamp is outside the supported dates (1900-01-01 to 2299-12-31)",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u", "timestamp": "9999-12-31T23:59:59.999Z"}',
        "timestamp is outside",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u", "sentAt": "1899-12-31T23:59:59.999Z"}',
        "sentAt is outside",
    ),
    (
        b'{"type": "track", "event": "E", "userId": "u",'
        b' "originalTimestamp": "2299-12-31T00:00:00.000Z", "sentAt": "1900-01-02T00:00:00.000Z"}',
        "timestamp corrected for clock skew",
    ),
]


def _holdable(event: dict[str, Any]) -> bool:
    """Whether every later stage can hold the envelope: JSON fields and times in range."""
    for name in ("properties", "traits", "context", "integrations"):
        if not holdable(event[name].encode()):
            return False
    times = [event["timestamp"], event["received_at"], event["sent_at"]]
    times.append(event["original_timestamp"])
    return all(t is None or in_time_range(t) for t in times)


@pytest.mark.parametrize(("message", "reason"), HOSTILE)
async def test_a_number_or_time_no_later_stage_can_hold_is_rejected_with_its_reason(
    client: TestClient[Any, Any], kafka: KafkaSettings, message: bytes, reason: str
) -> None:
    body = b'{"batch": [' + GOOD + b", " + message + b", " + GOOD + b"]}"
    resp = await client.post("/v1/batch", data=body, headers=AUTH)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["accepted"] == 2
    [rejected] = answer["rejected"]
    assert rejected["index"] == 1
    assert reason in rejected["reason"]
    topics = Topics(kafka.topic_prefix)
    landed = read_topic(kafka, topics.ingest, 2)
    assert len(landed) == 2
    plain = event_codec(logical_types=False)
    assert all(_holdable(plain.decode(r.value())) for r in landed)
    [record] = read_topic(kafka, topics.rejected, 1)
    assert reason in dict(record.headers())["sluice.reason"].decode()


async def test_single_and_webhook_routes_reject_unholdable_numbers_with_the_reason(
    client: TestClient[Any, Any], kafka: KafkaSettings
) -> None:
    track = b'{"userId": "u", "event": "E", "properties": {"n": 1e999}}'
    resp = await client.post("/v1/track", data=track, headers=AUTH)
    assert resp.status == 400
    assert "overflows a 64-bit float" in (await resp.json())["rejected"][0]["reason"]
    hook = await client.post("/v1/webhook?writeKey=good-key", data=b'{"n": 18446744073709551615}')
    assert hook.status == 400
    assert "does not fit a signed 64-bit" in (await hook.json())["rejected"][0]["reason"]
    assert read_topic(kafka, Topics(kafka.topic_prefix).ingest, 0, timeout=1) == []
