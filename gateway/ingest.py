"""The ingest API: `/v1/batch`, `/v1/<type>` and `/v1/webhook`, answered after Kafka confirmed.

A request's body is read with its size and time bounded, its source admitted
(`gateway.admission`), and its messages turned into Avro records: by the fast path
(`gateway.fast_envelope`) when it can be sure of them, else by the general path
(`gateway.envelope`), which gives invalid messages their reason. Accepted records go to
the ingest topic and rejected ones, with failure headers, to the rejected topic; the
answer comes once Kafka confirmed both.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from core.config import Source
from core.errors import BrokerUnavailable, SchemaError
from core.headers import Failure, failure_headers
from core.kafka import Record
from gateway.admission import authenticate, body_key, key_source, rate_limit
from gateway.app_keys import CODEC, FAST, METRICS, PRODUCER, SETTINGS, TOPICS
from gateway.envelope import build_event, parse_timestamp, partition_key
from gateway.errors import InvalidEvent
from gateway.limits import too_deep
from gateway.messages import decode_batch, decode_single, write_key
from gateway.middleware import Handler
from gateway.numbers import loads
from gateway.responses import error, json_response

log = structlog.get_logger("sluice.gateway")

# The message types with a route of their own (`/v1/track`, ...).
_SINGLE_TYPES = ("track", "identify", "page", "screen", "group", "alias")


async def read_body(request: web.Request) -> bytes:
    """The request body; its decoded size and the time to receive it are bounded.

    aiohttp inflates gzip/deflate bodies while reading and enforces `client_max_size` on
    the inflated bytes as they stream, so a compression bomb stops at the limit. A body
    that has not arrived within `read_timeout_s` gets 408 and the connection is closed.
    """
    settings = request.app[SETTINGS]
    try:
        async with asyncio.timeout(settings.read_timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise error(413, f"request body exceeds {settings.max_request_bytes} bytes") from None
    except TimeoutError:
        exc = error(408, f"request body not received within {settings.read_timeout_s:g} s")
        exc.force_close()
        raise exc from None
    request.app[METRICS].payload_bytes.observe(len(raw))
    return raw


def _parse(request: web.Request, raw: bytes) -> Any:
    """The body's JSON, with its nesting depth bounded."""
    try:
        body = loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(400, f"body is not valid JSON: {exc}") from None
    depth = request.app[SETTINGS].max_json_depth
    if too_deep(body, depth):
        raise error(400, f"JSON nests deeper than {depth} levels")
    return body


def _now_ms() -> int:
    return int(time.time() * 1000)


async def handle_batch(request: web.Request) -> web.Response:
    """`POST /v1/batch`: many messages; valid ones are accepted, invalid ones reported."""
    keyed = key_source(request)
    raw = await read_body(request)
    decoded = decode_batch(raw)
    if decoded is not None:
        source = authenticate(request, keyed, write_key(decoded.writeKey))
        rate_limit(request, source, len(decoded.batch))
        records = request.app[FAST].records(
            raw, decoded.batch, source.id, _now_ms(), batch_sent_at=decoded.sentAt
        )
        if records is not None:
            return await _send(request, source, records, [], [])
    # The general path: also for batches the fast path stepped aside from.
    body = _parse(request, raw)
    if decoded is None:
        source = authenticate(request, keyed, body_key(body))
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise error(400, "body must be an object with a 'batch' array")
    messages = body["batch"]
    sent_at = body.get("sentAt")
    if sent_at is not None:
        # A batch-level sentAt (as Segment's SDKs send it) corrects every message's skew.
        try:
            parse_timestamp(sent_at, "sentAt")
        except InvalidEvent as exc:
            raise error(400, str(exc)) from None
        messages = [
            {**m, "sentAt": sent_at} if isinstance(m, dict) and "sentAt" not in m else m
            for m in messages
        ]
    if decoded is None:
        rate_limit(request, source, len(messages))
    return await _accept(request, source, messages, None)


def single(default_type: str) -> Handler:
    """A handler for `/v1/<type>`: one message whose type defaults to the route's."""

    async def handle(request: web.Request) -> web.Response:
        keyed = key_source(request)
        raw = await read_body(request)
        decoded = decode_single(raw)
        if decoded is not None:
            source = authenticate(request, keyed, write_key(decoded.writeKey))
            rate_limit(request, source, 1)
            records = request.app[FAST].records(
                raw, [decoded], source.id, _now_ms(), default_type=default_type
            )
            if records is not None:
                return await _send(request, source, records, [], [])
        body = _parse(request, raw)
        if decoded is None:
            source = authenticate(request, keyed, body_key(body))
            rate_limit(request, source, 1)
        return await _accept(request, source, [body], default_type)

    return handle


async def handle_webhook(request: web.Request) -> web.Response:
    """`POST /v1/webhook`: any JSON body becomes one `webhook` event of the key's source."""
    keyed = key_source(request)
    body = _parse(request, await read_body(request))
    source = authenticate(request, keyed, body_key(body))
    if isinstance(body, dict):
        body.pop("writeKey", None)
    message = {
        "type": "webhook",
        "messageId": request.headers.get("X-Message-Id") or request.headers.get("Idempotency-Key"),
        "anonymousId": request.headers.get("X-Anonymous-Id"),
        "properties": body if isinstance(body, dict) else {"payload": body},
        "context": {
            "webhook": {"path": request.path, "userAgent": request.headers.get("User-Agent")}
        },
    }
    rate_limit(request, source, 1)
    return await _accept(request, source, [message], "webhook")


def add_routes(app: web.Application) -> None:
    """The ingest routes on `app`."""
    app.router.add_post("/v1/batch", handle_batch)
    for etype in _SINGLE_TYPES:
        app.router.add_post(f"/v1/{etype}", single(etype))
    app.router.add_post("/v1/webhook", handle_webhook)


async def _accept(
    request: web.Request, source: Source, messages: list[Any], default_type: str | None
) -> web.Response:
    """The general path: each message through `build_event`, the invalid ones reported."""
    app = request.app
    settings, codec = app[SETTINGS], app[CODEC]
    received_at = _now_ms()
    accepted: list[Record] = []
    rejected: list[dict[str, Any]] = []
    rejected_records: list[Record] = []
    times: dict[Any, int | None] = {}
    for index, msg in enumerate(messages):
        try:
            event = build_event(msg, source.id, received_at, default_type, times)
            value = codec.encode(event)
            if len(value) > settings.max_event_bytes:
                raise InvalidEvent(f"event exceeds {settings.max_event_bytes} bytes")
        except (InvalidEvent, SchemaError) as exc:
            reason = str(exc)
            rejected.append({"index": index, "reason": reason})
            rejected_records.append(
                _rejected_record(source.id, msg, reason, settings.max_event_bytes)
            )
            continue
        accepted.append((partition_key(event), value, None))
    return await _send(request, source, accepted, rejected, rejected_records)


async def _send(
    request: web.Request,
    source: Source,
    accepted: list[Record],
    rejected: list[dict[str, Any]],
    rejected_records: list[Record],
) -> web.Response:
    """Produce the accepted and rejected records; 200 once Kafka confirmed all of them."""
    app = request.app
    metrics, topics, producer = app[METRICS], app[TOPICS], app[PRODUCER]
    started = time.perf_counter()
    try:
        if rejected_records:
            await asyncio.gather(
                producer.send_batch(topics.ingest, accepted),
                producer.send_batch(topics.rejected, rejected_records),
            )
        else:
            await producer.send_batch(topics.ingest, accepted)
    except BrokerUnavailable as exc:
        count = len(accepted) + len(rejected)
        metrics.events.labels(source.id, "failed").inc(count)
        log.warning("produce failed", source=source.id, events=count, error=str(exc))
        raise error(
            503, "the event log is unavailable; retry later", **{"Retry-After": "1"}
        ) from None
    metrics.produce_seconds.observe(time.perf_counter() - started)
    metrics.events.labels(source.id, "accepted").inc(len(accepted))
    if rejected:
        metrics.events.labels(source.id, "rejected").inc(len(rejected))
    status = 400 if rejected and not accepted else 200
    return json_response({"accepted": len(accepted), "rejected": rejected}, status=status)


def _rejected_record(source_id: str, msg: Any, reason: str, limit: int) -> Record:
    raw = orjson.dumps(msg)
    if len(raw) > limit:
        raw = raw[:limit]
    now = int(time.time() * 1000)
    failure = Failure(None, "gateway", InvalidEvent(reason), 1, now, now)
    headers = failure_headers(None, None, failure, source=source_id)
    return (source_id.encode(), raw, headers)
