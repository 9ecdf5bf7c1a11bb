"""The failure-header contract: what a record carries when it fails, written in one place.

A record that failed goes on (to a retry tier, a dead-letter topic, a job's retry lane)
with headers, in the spirit of Kafka Connect's `__connect.errors.*`, that say where it
first came from, which stage failed it and why, how often, and when it is due again. The
gateway, the worker, the sink and the delivery all write them with `failure_headers`;
the DLQ tools, redrive and replay read them with `header_map`. Pure functions: no Kafka.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from confluent_kafka import Message

from core.kafka import Headers as ProducerHeaders

ORIGINAL_TOPIC: Final = "sluice.original.topic"
ORIGINAL_PARTITION: Final = "sluice.original.partition"
ORIGINAL_OFFSET: Final = "sluice.original.offset"
ORIGINAL_TIMESTAMP: Final = "sluice.original.timestamp"
DESTINATION: Final = "sluice.destination"
STAGE: Final = "sluice.stage"
ERROR_CLASS: Final = "sluice.error.class"
ERROR_MESSAGE: Final = "sluice.error.message"
ATTEMPTS: Final = "sluice.attempts"
FIRST_FAILURE: Final = "sluice.first.failure"
LAST_FAILURE: Final = "sluice.last.failure"
RETRY_TIER: Final = "sluice.retry.tier"
RETRY_DUE: Final = "sluice.retry.due"
# Which record of the destination topic this retry is for (`partition:offset`): in
# order-preserving mode the key of a parked record is released when this one resolves.
RETRY_REF: Final = "sluice.retry.ref"
# The failure in one line (the message), for readers that want no more than that.
REASON: Final = "sluice.reason"
ERROR_TRACEBACK: Final = "sluice.error.traceback"
SOURCE: Final = "sluice.source"
# Where a replayed record was read from (`topic:partition:offset`).
REPLAY_OF: Final = "sluice.replay.of"
# Redrive history: the DLQ record a redriven record came from, the redrive's id, and how
# many times the record was redriven.
REDRIVE_FROM: Final = "sluice.redrive.from"
REDRIVE_ID: Final = "sluice.redrive.id"
REDRIVE_COUNT: Final = "sluice.redrive.count"
REDRIVE_PREFIX: Final = "sluice.redrive."

# Headers that describe one failure; a new failure replaces them. Anything else (the
# producer's own headers, `sluice.redrive.*` history) travels on unchanged.
FAILURE_HEADERS: Final = frozenset(
    {
        DESTINATION,
        STAGE,
        ERROR_CLASS,
        ERROR_MESSAGE,
        ATTEMPTS,
        FIRST_FAILURE,
        LAST_FAILURE,
        RETRY_TIER,
        RETRY_DUE,
        RETRY_REF,
        ERROR_TRACEBACK,
        REASON,
        SOURCE,
    }
)
_ORIGIN_HEADERS: Final = (ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET, ORIGINAL_TIMESTAMP)

Headers = list[tuple[str, bytes]]
RawHeaders = Sequence[tuple[str, bytes | str | None]] | None


def message_headers(msg: Message) -> Headers:
    """A consumed record's headers as (name, bytes) pairs."""
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs]


@dataclass(frozen=True)
class Origin:
    """Where a record first came from: topic, partition, offset and timestamp (ms)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True)
class Failure:
    """One failed delivery of a record, with what came before it."""

    destination: str | None  # None: before any destination (the gateway, the processor)
    stage: str
    error: BaseException
    attempts: int
    first_failure_ms: int
    now_ms: int


@dataclass(frozen=True)
class RetryPlan:
    """Where a record waits for its next attempt: tier index, and the due time in ms."""

    tier: int
    due_ms: int


def header_map(headers: RawHeaders) -> dict[str, str]:
    """Headers as text, the last value of a repeated name winning."""
    out: dict[str, str] = {}
    for name, value in headers or ():
        if isinstance(value, bytes):
            out[name] = value.decode("utf-8", "replace")
        elif value is not None:
            out[name] = value
    return out


def attempts_so_far(headers: dict[str, str]) -> int:
    """Attempts recorded on a retry record (0 for a record that was not tried yet)."""
    try:
        return max(0, int(headers.get(ATTEMPTS, "0")))
    except ValueError:
        return 0


def int_header(headers: dict[str, str], name: str) -> int | None:
    """An integer header, or None when it is missing or not a number."""
    value = headers.get(name)
    if value is None:
        return None  # most records have none: no exception raised and caught for them
    try:
        return int(value)
    except ValueError:
        return None


def origin_of(headers: dict[str, str], own: Origin) -> Origin:
    """The record's first origin: from its headers when it was moved before, else `own`."""
    topic = headers.get(ORIGINAL_TOPIC)
    partition = int_header(headers, ORIGINAL_PARTITION)
    offset = int_header(headers, ORIGINAL_OFFSET)
    if topic is None or partition is None or offset is None:
        return own
    return Origin(topic, partition, offset, int_header(headers, ORIGINAL_TIMESTAMP) or 0)


def failure_headers(
    headers: RawHeaders,
    origin: Origin | None,
    failure: Failure,
    plan: RetryPlan | None = None,
    tier_name: str | None = None,
    ref: str | None = None,
    traceback: str | None = None,
    source: str | None = None,
) -> ProducerHeaders:
    """The record's headers with this failure recorded (and, for a retry, where and when).

    The headers of an earlier failure are replaced; any other header travels on. `origin`
    is None for a record that never was on a topic (the gateway refused it).
    """
    kept: ProducerHeaders = []
    for name, value in headers or ():
        if name in FAILURE_HEADERS or name in _ORIGIN_HEADERS:
            continue
        kept.append((name, value.encode() if isinstance(value, str) else (value or b"")))
    error = failure.error
    message = str(error)[:1000].encode()
    out: ProducerHeaders = kept
    if origin is not None:
        out += [
            (ORIGINAL_TOPIC, origin.topic.encode()),
            (ORIGINAL_PARTITION, str(origin.partition).encode()),
            (ORIGINAL_OFFSET, str(origin.offset).encode()),
            (ORIGINAL_TIMESTAMP, str(origin.timestamp_ms).encode()),
        ]
    if failure.destination is not None:
        out.append((DESTINATION, failure.destination.encode()))
    if source is not None:
        out.append((SOURCE, source.encode()))
    out += [
        (STAGE, failure.stage.encode()),
        (ERROR_CLASS, type(error).__name__.encode()),
        (ERROR_MESSAGE, message),
        (REASON, message),
        (ATTEMPTS, str(failure.attempts).encode()),
        (FIRST_FAILURE, str(failure.first_failure_ms).encode()),
        (LAST_FAILURE, str(failure.now_ms).encode()),
    ]
    if plan is not None:
        out.append((RETRY_TIER, (tier_name or str(plan.tier)).encode()))
        out.append((RETRY_DUE, str(plan.due_ms).encode()))
    if ref is not None:
        out.append((RETRY_REF, ref.encode()))
    if traceback is not None:
        out.append((ERROR_TRACEBACK, traceback[-8000:].encode()))
    return out
