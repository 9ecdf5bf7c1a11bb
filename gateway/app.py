"""The gateway's aiohttp application: ingestion routes, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.config import PipelineConfig, Source
from core.config_topic import ConfigFollower
from core.errors import BrokerUnavailable, SchemaError
from core.headers import Failure, failure_headers
from core.kafka import Record
from core.producer import EventProducer
from core.settings import GatewaySettings, KafkaSettings, TransformSettings
from core.topics import Topics
from gateway.auth import SourceTable, basic_username
from gateway.envelope import build_event, parse_timestamp, partition_key
from gateway.errors import InvalidEvent
from gateway.fastpath import FastWriter
from gateway.limits import too_deep
from gateway.messages import decode_batch, decode_single, write_key
from gateway.metrics import GatewayMetrics
from gateway.numbers import loads
from gateway.openapi import openapi_document
from gateway.server import serve
from schemas.codec import AvroCodec, event_codec

log = structlog.get_logger("sluice.gateway")

SETTINGS = web.AppKey("settings", GatewaySettings)
PRODUCER = web.AppKey("producer", EventProducer)
METRICS = web.AppKey("metrics", GatewayMetrics)
SOURCES = web.AppKey("sources", SourceTable)
CODEC = web.AppKey("codec", AvroCodec)
TOPICS = web.AppKey("topics", Topics)
FAST = web.AppKey("fast", FastWriter)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, reason: str, **headers: str) -> web.HTTPException:
    exc = web.HTTPException(
        text=orjson.dumps({"error": reason}).decode(),
        content_type="application/json",
        headers=headers,
    )
    exc.set_status(status)
    return exc


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests by route and status, and turns every error into a JSON body."""
    metrics = request.app[METRICS]
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "-"
    )
    metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if exc.content_type != "application/json":
            reason = exc.reason if exc.status >= 400 else ""
            if status == 413:
                reason = "request body too large"
            if reason:
                exc.text = orjson.dumps({"error": reason}).decode()
                exc.content_type = "application/json"
        raise
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(route, str(status)).inc()


async def _read(request: web.Request) -> bytes:
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
        raise _error(413, f"request body exceeds {settings.max_request_bytes} bytes") from None
    except TimeoutError:
        exc = _error(408, f"request body not received within {settings.read_timeout_s:g} s")
        exc.force_close()
        raise exc from None
    request.app[METRICS].payload_bytes.observe(len(raw))
    return raw


def _parse(request: web.Request, raw: bytes) -> Any:
    """The body's JSON, with its nesting depth bounded."""
    try:
        body = loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _error(400, f"body is not valid JSON: {exc}") from None
    depth = request.app[SETTINGS].max_json_depth
    if too_deep(body, depth):
        raise _error(400, f"JSON nests deeper than {depth} levels")
    return body


def _body_key(body: Any) -> str | None:
    key = body.get("writeKey") if isinstance(body, dict) else None
    return key if isinstance(key, str) else None


def _unauthorized() -> web.HTTPException:
    return _error(
        401, "unknown or missing write key", **{"WWW-Authenticate": 'Basic realm="sluice"'}
    )


def _key_source(request: web.Request) -> Source | None:
    """The source of the key in the request's header or URL, checked before the body is read.

    A key there decides: an unknown one gets 401 without a byte of the body read or
    parsed. None when neither carries a key (then the body's `writeKey` decides).
    """
    sources = request.app[SOURCES]
    header = request.headers.get("Authorization")
    if header:
        source = sources.source_for_header(header)
        if source is not None:
            return source
        if basic_username(header) is not None:
            raise _unauthorized()
    # Webhook senders often cannot set headers: `?writeKey=` as RudderStack allows.
    key = request.query.get("writeKey")
    if key is None:
        return None
    source = sources.source_for(key)
    if source is None:
        raise _unauthorized()
    return source


def _authenticate(request: web.Request, source: Source | None, body_key: str | None) -> Source:
    """`source` (from the header or URL) or else the source of the body's `writeKey`."""
    if source is not None:
        return source
    found = request.app[SOURCES].source_for(body_key)
    if found is None:
        raise _unauthorized()
    return found


def _now_ms() -> int:
    return int(time.time() * 1000)


async def handle_batch(request: web.Request) -> web.Response:
    """`POST /v1/batch`: many messages; valid ones are accepted, invalid ones reported."""
    keyed = _key_source(request)
    raw = await _read(request)
    decoded = decode_batch(raw)
    if decoded is not None:
        source = _authenticate(request, keyed, write_key(decoded.writeKey))
        _rate_limit(request, source, len(decoded.batch))
        records = request.app[FAST].records(
            raw, decoded.batch, source.id, _now_ms(), batch_sent_at=decoded.sentAt
        )
        if records is not None:
            return await _send(request, source, records, [], [])
    # The general path: also for batches the fast path stepped aside from.
    body = _parse(request, raw)
    if decoded is None:
        source = _authenticate(request, keyed, _body_key(body))
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise _error(400, "body must be an object with a 'batch' array")
    messages = body["batch"]
    sent_at = body.get("sentAt")
    if sent_at is not None:
        # A batch-level sentAt (as Segment's SDKs send it) corrects every message's skew.
        try:
            parse_timestamp(sent_at, "sentAt")
        except InvalidEvent as exc:
            raise _error(400, str(exc)) from None
        messages = [
            {**m, "sentAt": sent_at} if isinstance(m, dict) and "sentAt" not in m else m
            for m in messages
        ]
    if decoded is None:
        _rate_limit(request, source, len(messages))
    return await _accept(request, source, messages, None)


def single(default_type: str) -> Handler:
    """A handler for `/v1/<type>`: one message whose type defaults to the route's."""

    async def handle(request: web.Request) -> web.Response:
        keyed = _key_source(request)
        raw = await _read(request)
        decoded = decode_single(raw)
        if decoded is not None:
            source = _authenticate(request, keyed, write_key(decoded.writeKey))
            _rate_limit(request, source, 1)
            records = request.app[FAST].records(
                raw, [decoded], source.id, _now_ms(), default_type=default_type
            )
            if records is not None:
                return await _send(request, source, records, [], [])
        body = _parse(request, raw)
        if decoded is None:
            source = _authenticate(request, keyed, _body_key(body))
            _rate_limit(request, source, 1)
        return await _accept(request, source, [body], default_type)

    return handle


async def handle_webhook(request: web.Request) -> web.Response:
    """`POST /v1/webhook`: any JSON body becomes one `webhook` event of the key's source."""
    keyed = _key_source(request)
    body = _parse(request, await _read(request))
    source = _authenticate(request, keyed, _body_key(body))
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
    _rate_limit(request, source, 1)
    return await _accept(request, source, [message], "webhook")


def _rate_limit(request: web.Request, source: Source, count: int) -> None:
    bucket = request.app[SOURCES].bucket(source.id)
    if bucket is None:
        return
    wait = bucket.take(count)
    if wait == 0:
        return
    request.app[METRICS].events.labels(source.id, "rate_limited").inc(count)
    if wait == float("inf"):
        reason = f"{count} events exceed the source's burst of {bucket.capacity:.0f}; send fewer per request"
        raise _error(429, reason, **{"Retry-After": "1"})
    raise _error(
        429, "rate limit exceeded for this source", **{"Retry-After": str(max(1, math.ceil(wait)))}
    )


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
        raise _error(
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


async def handle_health(_request: web.Request) -> web.Response:
    """`GET /health`: the process is up."""
    return json_response({"status": "ok"})


async def handle_ready(request: web.Request) -> web.Response:
    """`GET /ready`: the broker answers; 503 otherwise."""
    loop = asyncio.get_running_loop()
    ok = await loop.run_in_executor(None, request.app[PRODUCER].reachable)
    if not ok:
        return json_response({"status": "broker unreachable"}, status=503)
    return json_response({"status": "ready"})


async def handle_openapi(_request: web.Request) -> web.Response:
    """`GET /openapi.json`: the API description."""
    return json_response(openapi_document())


async def handle_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _producer_ctx(
    kafka: KafkaSettings, settings: GatewaySettings
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        producer = EventProducer(kafka, settings.produce_timeout_s, settings.linger_ms)
        app[PRODUCER] = producer
        yield
        left = await asyncio.get_running_loop().run_in_executor(None, producer.close)
        if left:
            log.error("records not delivered at shutdown", count=left)

    return ctx


def _config_ctx(
    kafka: KafkaSettings, cfg: PipelineConfig, transforms: TransformSettings | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        sources = app[SOURCES]
        follower = ConfigFollower(
            kafka,
            cfg,
            lambda new: loop.call_soon_threadsafe(sources.update, new),
            transforms,
            app[METRICS].registry,
        )
        follower.start()
        yield
        await loop.run_in_executor(None, follower.stop)

    return ctx


def create_app(
    settings: GatewaySettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings | None = None,
) -> web.Application:
    """The gateway app; the producer opens with the app and flushes when it closes.

    `transforms`: the modules config records may name transforms from (None: none).
    """
    app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[_observe])
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    app[SOURCES] = SourceTable(cfg)
    app[CODEC] = event_codec()
    app[TOPICS] = Topics(kafka.topic_prefix)
    app[FAST] = FastWriter(app[CODEC], settings.max_event_bytes, settings.max_json_depth)
    app.cleanup_ctx.append(_producer_ctx(kafka, settings))
    app.cleanup_ctx.append(_config_ctx(kafka, cfg, transforms))
    app.router.add_post("/v1/batch", handle_batch)
    for etype in ("track", "identify", "page", "screen", "group", "alias"):
        app.router.add_post(f"/v1/{etype}", single(etype))
    app.router.add_post("/v1/webhook", handle_webhook)
    app.router.add_get("/openapi.json", handle_openapi)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/metrics", handle_metrics)
    return app


def run(
    settings: GatewaySettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings,
) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests finish and the producer flushes."""
    import uvloop  # noqa: PLC0415 - only the served process needs it

    # Start-up objects (modules, schemas, config) never become garbage: keep the
    # collector from rescanning them, and collect the young generation less often
    # (every request allocates hundreds of short-lived containers).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)

    app = create_app(settings, kafka, cfg, transforms)
    serve(app, settings, app[METRICS], uvloop.new_event_loop())
    log.info("gateway stopped")
