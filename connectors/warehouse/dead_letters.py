"""The warehouse sink's dead letters: records it cannot load, to the destination's DLQ.

Each carries the failure headers (`core.headers`) with the engine's or the decoder's error,
and the batch is committed only after the DLQ confirmed every one of them.
"""

from __future__ import annotations

import time

import structlog
from confluent_kafka import KafkaException, Producer

from connectors.warehouse.buffer import DeadRecord
from connectors.warehouse.metrics import SinkMetrics
from connectors.warehouse.targets import SinkTarget
from core.headers import Failure, Origin, failure_headers, message_headers
from core.kafka import idempotent_producer
from core.settings import KafkaSettings

log = structlog.get_logger("sluice.sink")


class DeadLetters:
    """Writes a batch's dead records to its destination's DLQ and waits for the acks."""

    def __init__(self, kafka: KafkaSettings, metrics: SinkMetrics) -> None:
        self._kafka = kafka
        self._metrics = metrics
        # Made on the first dead letter: most sinks never write one.
        self._producer: Producer | None = None

    def send(self, target: SinkTarget, dead: list[DeadRecord]) -> None:
        """Produce `dead` to `target.dlq`; raises KafkaException unless all were confirmed."""
        if self._producer is None:
            self._producer = idempotent_producer(self._kafka)
        failed: list[str] = []
        now_ms = int(time.time() * 1000)
        for msg, exc in dead:
            self._producer.produce(
                target.dlq,
                msg.value(),
                msg.key(),
                headers=failure_headers(
                    message_headers(msg),
                    Origin(
                        msg.topic() or "",
                        msg.partition() or 0,
                        msg.offset() or 0,
                        msg.timestamp()[1],
                    ),
                    Failure(target.destination, "sink", exc, 1, now_ms, now_ms),
                ),
                on_delivery=lambda err, _m: failed.append(err.str()) if err else None,
            )
        if self._producer.flush(30) or failed:
            raise KafkaException(f"dead letters not confirmed: {failed[:1] or 'timeout'}")
        for _msg, exc in dead:
            self._metrics.dead_lettered.labels(target.destination, type(exc).__name__).inc()
        log.warning("dead-lettered records", destination=target.destination, count=len(dead))
