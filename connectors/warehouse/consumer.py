"""The warehouse sink's Kafka consumer: how it is configured, and how far behind it is."""

from __future__ import annotations

from confluent_kafka import Consumer

from core.settings import KafkaSettings, WarehouseSettings


def sink_consumer(kafka: KafkaSettings, settings: WarehouseSettings) -> Consumer:
    """A consumer that commits by hand, reads committed records only, and rebalances
    cooperatively; with a static member id in embedded mode (one sink owns the folder)."""
    return Consumer(
        kafka.client_config()
        | {
            "group.id": settings.consumer_group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": settings.session_timeout_ms,
            "max.poll.interval.ms": settings.max_poll_interval_ms,
        }
        | _static_membership(settings)
    )


def records_behind(consumer: Consumer) -> int:
    """Records between the consumer's positions (or committed offsets) and the high
    watermarks of its assignment; raises KafkaException when the broker does not answer."""
    assignment = consumer.assignment()
    positions = consumer.position(assignment) if assignment else []
    unknown = [tp for tp in positions if tp.offset < 0]
    committed = {
        (tp.topic, tp.partition): tp.offset
        for tp in (consumer.committed(unknown, timeout=5) if unknown else [])
    }
    waiting = 0
    for tp in positions:
        low, high = consumer.get_watermark_offsets(tp, timeout=5)
        at = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
        waiting += max(0, high - (at if at >= 0 else low))
    return waiting


def _static_membership(settings: WarehouseSettings) -> dict[str, str]:
    instance = settings.instance_id
    if instance is None and settings.dsn.startswith("chdb:"):
        instance = f"{settings.consumer_group}-embedded"
    return {"group.instance.id": instance} if instance else {}
