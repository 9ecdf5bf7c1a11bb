"""Kafka producers: the one factory every process uses, and what a delivery error means.

Every producer Sluice makes is idempotent with `acks=all` (a record Kafka confirmed is on
every in-sync replica, once), and routes librdkafka's log lines through Python logging.
`idempotent_producer` makes the plain one (tools, the registry, the sink's DLQ, config
writes); `core.producer.EventProducer` wraps one for asyncio callers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, Producer

from core.errors import BrokerUnavailable, RecordRefused, SluiceError
from core.settings import KafkaSettings

Headers = list[tuple[str, str | bytes | None]]
# (key, value, headers); a None value is a tombstone on a compacted topic.
Record = tuple[bytes | None, bytes | None, Sequence[tuple[str, str | bytes | None]] | None]

# Delivery errors that come again however often the record is sent: the record is too
# large, invalid or not allowed on its topic, or the topic is not there after librdkafka's
# own retries. (librdkafka's `KafkaError.retriable()` is set for errors of its
# transactional API only, never on a delivery report, so the code decides.)
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
    }
)
# Of those, the errors of a topic, not of a record: a smaller record is refused as well.
TOPIC_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
    }
)
# Of those, the errors a broker gives a whole record batch: every record sent in it gets
# the error, though one of them may have caused it. Sent alone, each gets its own verdict.
BATCH_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
    }
)


def delivery_error(err: KafkaError, topic: str) -> SluiceError:
    """The Sluice error for a record Kafka did not take; its class says whether to send again.

    RecordRefused (not retriable) for the errors in PERMANENT_ERRORS; BrokerUnavailable
    (retriable) for everything else: a broker away, a timeout, not enough replicas, and
    fatal producer states too (a new producer sends the record again).
    """
    if err.code() in PERMANENT_ERRORS and not err.retriable():
        return RecordRefused(f"{topic}: {err.str()} ({err.name()})")
    return BrokerUnavailable(f"{topic}: {err.str()} ({err.name()})")


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """The configuration of an idempotent, acks=all producer, with `overrides` on top.

    Names are librdkafka's (`linger.ms`, `transactional.id`, ...). Idempotence and acks
    cannot be turned off here.
    """
    conf: dict[str, Any] = kafka.client_config() | {
        # librdkafka's own log lines go through Python logging, not straight to stderr.
        "logger": logging.getLogger("sluice.kafka"),
    }
    conf.update(overrides)
    conf.update({"enable.idempotence": True, "acks": "all"})
    return conf


def idempotent_producer(kafka: KafkaSettings, **overrides: Any) -> Producer:
    """A producer whose confirmed records are on every in-sync replica, each once."""
    return Producer(producer_config(kafka, **overrides))
