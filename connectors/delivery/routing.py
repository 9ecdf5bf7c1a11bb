"""Where a record goes when it is not delivered: its next retry tier, or the DLQ.

A failure whose error says it is retriable (`DestinationUnavailable`) sends the record
to the tier the retry policy (`connectors/retry.py`) picks for its attempt count, with
its due time; a fatal one, spent retries, or a record that does not decode, to the
destination's DLQ. Either way the record carries the failure headers
(`core.headers.failure_headers`) and keeps its partition number. Every write is
confirmed by Kafka before the caller goes on (`durably`): a record's offset is committed
only once it is somewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import structlog
from confluent_kafka import Message

from connectors.delivery.metrics import DeliveryMetrics
from connectors.retry import plan_retry
from core.config import RetryPolicy
from core.errors import BrokerUnavailable, SchemaError, SluiceError
from core.headers import Failure, Origin, failure_headers, header_map, message_headers, origin_of
from core.kafka import Record
from core.producer import EventProducer
from core.topics import DestinationTopics
from schemas.codec import AvroCodec

log = structlog.get_logger("sluice.delivery")
T = TypeVar("T")


class Routing:
    """Moves one destination's failed and undecodable records to its tiers and its DLQ."""

    def __init__(
        self,
        destination: str,
        topics: DestinationTopics,
        policy: RetryPolicy,
        codec: AvroCodec,
        metrics: DeliveryMetrics,
    ) -> None:
        self.destination = destination
        self.topics = topics
        self.policy = policy
        self.codec = codec
        self.metrics = metrics
        self.producer: EventProducer | None = None  # set when the delivery runs

    async def failed(
        self,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        origin: Origin,
        error: BaseException,
        attempts: int,
        first_failure_ms: int,
        ref: str | None,
    ) -> bool:
        """Send a failed record to its next tier (True) or to the DLQ (False)."""
        now = now_ms()
        failure = Failure(self.destination, "delivery", error, attempts, first_failure_ms, now)
        plan = None
        if isinstance(error, SluiceError) and error.retriable:
            plan = plan_retry(self.policy, attempts, first_failure_ms, now, error.retry_after)
        if plan is not None:
            tier = self.topics.tiers[plan.tier]
            record: Record = (
                key,
                value,
                failure_headers(headers, origin, failure, plan, tier, ref),
            )
            await durably(partial(self.send, self.topics.retry(plan.tier), [record], partition))
            self.metrics.retries.labels(self.destination, tier).inc()
            self.metrics.events.labels(self.destination, "retried").inc()
            return True
        record = (key, value, failure_headers(headers, origin, failure))
        await durably(partial(self.send, self.topics.dlq, [record], partition))
        self.metrics.dead_letters.labels(self.destination, "delivery", type(error).__name__).inc()
        self.metrics.events.labels(self.destination, "dead_lettered").inc()
        log.warning("dead-lettered", destination=self.destination, error=str(error))
        return False

    async def decode(self, msg: Message) -> dict[str, Any] | None:
        """The event of a consumed record, or None after dead-lettering it."""
        own = Origin(msg.topic() or "", msg.partition() or 0, msg.offset() or 0, written_ms(msg))
        return await self.decode_value(msg.key(), msg.value() or b"", message_headers(msg), own)

    async def decode_value(
        self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], own: Origin
    ) -> dict[str, Any] | None:
        """The event, or None after dead-lettering a record that does not decode."""
        try:
            return self.codec.decode(value)
        except SchemaError as exc:
            now = now_ms()
            origin = origin_of(header_map(headers), own)
            failure = Failure(self.destination, "decode", exc, 0, now, now)
            record: Record = (key, value, failure_headers(headers, origin, failure))
            await durably(partial(self.send, self.topics.dlq, [record], own.partition))
            self.metrics.dead_letters.labels(self.destination, "decode", "SchemaError").inc()
            self.metrics.events.labels(self.destination, "dead_lettered").inc()
            return None

    async def send(self, topic: str, records: list[Record], partition: int) -> None:
        """Produce `records` to `partition` of `topic`, confirmed (BrokerUnavailable if not)."""
        assert self.producer is not None
        await self.producer.send_batch(topic, records, partition)


async def durably(write: Callable[[], Awaitable[T]]) -> T:
    """Retry a Kafka write until it is confirmed: nothing may be committed before."""
    delay = 0.5
    while True:
        try:
            return await write()
        except BrokerUnavailable as exc:
            log.warning("write not confirmed; retrying", error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def record_ref(msg: Message) -> str:
    """`partition:offset`: which record of the destination topic a retry or a hold is for."""
    return f"{msg.partition()}:{msg.offset()}"


def written_ms(msg: Message) -> int:
    """When the record was written (ms)."""
    return int(msg.timestamp()[1])


def now_ms() -> int:
    """The wall clock in ms, as failure headers and due times count it."""
    return int(time.time() * 1000)
