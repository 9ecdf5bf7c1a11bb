"""Delivery of a destination topic to a webhook: consume, pace, send, dead-letter, commit.

Offsets are committed only after every record they cover was delivered or written to the
destination's DLQ, so a crash redelivers (at least once) and never drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import structlog
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from connectors.webhook import CircuitBreaker, DeliveryRejected, Pacer, WebhookClient
from ops.config import WebhookConfig
from ops.producer import EventProducer, Headers
from ops.settings import KafkaSettings
from ops.topics import DestinationTopics
from schemas.codec import AvroCodec
from schemas.errors import BrokerUnavailable, DestinationUnavailable, SchemaError

log = structlog.get_logger("sluice.delivery")
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


class DeliveryMetrics:
    """Requests by outcome, events delivered, dead letters, breaker state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_webhook_requests_total",
            "Webhook requests by outcome (delivered, retriable, fatal).",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.events = Counter(
            "sluice_webhook_events_total",
            "Events by outcome (delivered, dead_lettered).",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.breaker = Gauge(
            "sluice_webhook_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["destination"],
            registry=self.registry,
        )


def dlq_headers(
    msg: Message,
    destination: str,
    error: Exception,
    attempts: int,
    first_failure: float,
    stage: str = "delivery",
) -> Headers:
    """Error headers that let an operator see why and redrive the record."""
    ts_type, ts = msg.timestamp()
    del ts_type
    now = time.time()
    return [
        *(msg.headers() or []),
        ("sluice.original.topic", (msg.topic() or "").encode()),
        ("sluice.original.partition", str(msg.partition()).encode()),
        ("sluice.original.offset", str(msg.offset()).encode()),
        ("sluice.original.timestamp", str(ts).encode()),
        ("sluice.destination", destination.encode()),
        ("sluice.stage", stage.encode()),
        ("sluice.error.class", type(error).__name__.encode()),
        ("sluice.error.message", str(error)[:1000].encode()),
        ("sluice.attempts", str(attempts).encode()),
        ("sluice.first.failure", str(int(first_failure * 1000)).encode()),
        ("sluice.last.failure", str(int(now * 1000)).encode()),
    ]


class WebhookDelivery:
    """Delivers one webhook destination's topic until `stop()`."""

    def __init__(
        self,
        destination: str,
        topics: DestinationTopics,
        cfg: WebhookConfig,
        kafka: KafkaSettings,
        group: str,
        codec: AvroCodec,
        metrics: DeliveryMetrics,
    ) -> None:
        self.destination = destination
        self.topics = topics
        self.cfg = cfg
        self.codec = codec
        self.metrics = metrics
        self.breaker = CircuitBreaker(cfg.breaker)
        self.pacer = Pacer(cfg.rate_limit.requests_per_s) if cfg.rate_limit else None
        self.kafka = kafka
        self._stopping = asyncio.Event()
        self._consumer = Consumer(
            kafka.client_config()
            | {
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # A paused destination (open breaker, long Retry-After) must not be
                # evicted from the group for not polling.
                "max.poll.interval.ms": 3_600_000,
                "session.timeout.ms": 10_000,
            }
        )
        self._partitions_total = 0
        self._mine: set[tuple[str, int]] = set()

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._mine |= {(tp.topic, tp.partition) for tp in parts}
        self._rebalanced(consumer)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._mine -= {(tp.topic, tp.partition) for tp in parts}
        self._rebalanced(consumer)

    def _rebalanced(self, consumer: Consumer) -> None:
        if self.pacer is None:
            return
        # The destination's rate is shared by partitions: this process sends its part.
        if not self._partitions_total:
            meta = consumer.list_topics(self.topics.main, timeout=10)
            self._partitions_total = len(meta.topics[self.topics.main].partitions)
        if self._mine:
            self.pacer.share = len(self._mine) / self._partitions_total

    async def run(self) -> None:
        """Consume and deliver until stopped."""
        loop = asyncio.get_running_loop()
        self._consumer.subscribe(
            [self.topics.main], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        producer = EventProducer(self.kafka, timeout_s=30.0)
        try:
            async with aiohttp.ClientSession() as session:
                client = WebhookClient(self.cfg, session)
                while not self._stopping.is_set():
                    msgs = await loop.run_in_executor(None, self._consumer.consume, 500, 0.5)
                    msgs = [m for m in msgs if _ok(m)]
                    if not msgs:
                        continue
                    done = await self._deliver_all(client, producer, msgs)
                    if done:
                        await loop.run_in_executor(None, self._commit, done)
                    if len(done) < len(msgs):
                        break  # stopping mid-batch: what was not delivered is redelivered
        finally:
            await loop.run_in_executor(None, producer.close)
            await loop.run_in_executor(None, self._consumer.close)

    def stop(self) -> None:
        """Finish the request in flight, commit what was delivered, stop."""
        self._stopping.set()

    async def _deliver_all(
        self, client: WebhookClient, producer: EventProducer, msgs: list[Message]
    ) -> list[Message]:
        done: list[Message] = []
        size = self.cfg.batch_size
        for i in range(0, len(msgs), size):
            chunk = msgs[i : i + size]
            if not await self._deliver(client, producer, chunk):
                break
            done.extend(chunk)
        return done

    async def _deliver(
        self, client: WebhookClient, producer: EventProducer, chunk: Sequence[Message]
    ) -> bool:
        """Deliver or dead-letter a chunk; False only when stopping before either happened."""
        events: list[dict[str, Any]] = []
        for msg in chunk:
            try:
                events.append(self.codec.decode(msg.value() or b""))
            except SchemaError as exc:
                await self._dead_letter(producer, [msg], exc, 1, time.time())
        if not events:
            return True
        attempts, first_failure, delay = 0, 0.0, 0.5
        while not self._stopping.is_set():
            if wait := self.breaker.until_probe():
                self.metrics.breaker.labels(self.destination).set(BREAKER_STATES["open"])
                await self._sleep(wait)
                continue
            if self.pacer is not None:
                await self.pacer.wait()
            attempts += 1
            try:
                await client.send(events)
            except DestinationUnavailable as exc:
                first_failure = first_failure or time.time()
                self.breaker.failure()
                self.metrics.requests.labels(self.destination, "retriable").inc()
                self.metrics.breaker.labels(self.destination).set(
                    BREAKER_STATES[self.breaker.state]
                )
                backoff = delay * (0.5 + random.random())  # noqa: S311 - jitter, not security
                await self._sleep(max(backoff, exc.retry_after or 0.0))
                delay = min(delay * 2, 30.0)
                continue
            except DeliveryRejected as exc:
                self.metrics.requests.labels(self.destination, "fatal").inc()
                await self._dead_letter(
                    producer, list(chunk), exc, attempts, first_failure or time.time()
                )
                return True
            self.breaker.success()
            self.metrics.breaker.labels(self.destination).set(BREAKER_STATES["closed"])
            self.metrics.requests.labels(self.destination, "delivered").inc()
            self.metrics.events.labels(self.destination, "delivered").inc(len(events))
            return True
        return False

    async def _dead_letter(
        self,
        producer: EventProducer,
        msgs: list[Message],
        error: Exception,
        attempts: int,
        first: float,
    ) -> None:
        records = [
            (m.key(), m.value() or b"", dlq_headers(m, self.destination, error, attempts, first))
            for m in msgs
        ]
        while True:
            try:
                await producer.send_batch(self.topics.dlq, records)
                break
            except BrokerUnavailable:
                # The DLQ must hold the record before its offset may be committed.
                await asyncio.sleep(1.0)
        self.metrics.events.labels(self.destination, "dead_lettered").inc(len(msgs))
        log.warning(
            "dead-lettered", destination=self.destination, count=len(msgs), error=str(error)
        )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _commit(self, done: list[Message]) -> None:
        last: dict[tuple[str, int], int] = {}
        for msg in done:
            key = (msg.topic() or "", msg.partition() or 0)
            last[key] = max(last.get(key, -1), msg.offset() or 0)
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()], asynchronous=False
        )


def _ok(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume error", error=err.str())
    return False
