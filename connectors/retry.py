"""Retry decisions and the headers that carry a record's failure history.

A record that failed in a way worth retrying goes to one of its destination's delay
topics (`sluice.dest.<d>.retry.<tier>`) with its due time in `sluice.retry.due`; one
that failed for good, or whose retries are spent, goes to `sluice.dest.<d>.dlq`. Both
carry the same error headers, in the spirit of Kafka Connect's `__connect.errors.*`,
so a dead letter says where it came from, why it failed and how often, and can be
redriven as it is. Pure functions: no Kafka here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

from confluent_kafka import Message

from ops.config import RetryPolicy
from ops.producer import Headers as ProducerHeaders

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

# Headers that describe one failure; a new failure replaces them. Anything else (the
# producer's own headers, `sluice.redrive.*` history) travels on unchanged.
_FAILURE_HEADERS: Final = frozenset(
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
        "sluice.error.traceback",
        "sluice.reason",
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

    destination: str
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
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return None


def origin_of(headers: dict[str, str], own: Origin) -> Origin:
    """The record's first origin: from its headers when it was moved before, else `own`."""
    topic = headers.get(ORIGINAL_TOPIC)
    partition = int_header(headers, ORIGINAL_PARTITION)
    offset = int_header(headers, ORIGINAL_OFFSET)
    if topic is None or partition is None or offset is None:
        return own
    return Origin(topic, partition, offset, int_header(headers, ORIGINAL_TIMESTAMP) or 0)


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """A `Retry-After` header as seconds to wait (>= 0, possibly `inf`), or None.

    Both forms of RFC 9110 are read: delay-seconds and an HTTP-date (a date in the past
    means now). Anything else (garbage, `nan`, a date no calendar holds) is None: the
    record waits as its tier says. How long is too long is the retry policy's call
    (`plan_retry` caps it), not the parser's.
    """
    if value is None or not (text := value.strip()):
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        now = datetime.fromtimestamp(time.time() if now_s is None else now_s, UTC)
        seconds = (when - now).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def capped_retry_after(policy: RetryPolicy, retry_after_s: float | None) -> float | None:
    """A Retry-After within the policy: None when unusable, never above its cap or below 0."""
    if retry_after_s is None or math.isnan(retry_after_s):
        return None
    return min(max(0.0, retry_after_s), policy.max_retry_after_s)


def longest_wait_s(policy: RetryPolicy) -> float:
    """The longest a record of this policy may wait in a tier, jitter included."""
    return max(policy.delays[-1], policy.max_retry_after_s) * (1 + policy.jitter)


def plan_retry(
    policy: RetryPolicy,
    attempts: int,
    first_failure_ms: int,
    now_ms: int,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> RetryPlan | None:
    """The tier and due time of the next attempt after `attempts` failed ones, or None.

    None means give up: `max_attempts` attempts were made and the first failure is
    `max_age_s` old. A Retry-After the destination asked for is honoured up to the
    policy's cap (`max_retry_after_s`, 1 h by default): the record
    waits in the shortest tier that is at least that long (the last one otherwise), and
    never comes due before it. A non-finite, negative or absurd value is capped, never
    a crash or a record parked for years.
    """
    age_s = (now_ms - first_failure_ms) / 1000
    if attempts >= policy.max_attempts and age_s >= policy.max_age_s:
        return None
    delays = policy.delays
    tier = min(max(attempts, 1), len(delays)) - 1
    wait = delays[tier]
    retry_after_s = capped_retry_after(policy, retry_after_s)
    if retry_after_s is not None and retry_after_s > wait:
        tier = next((i for i, d in enumerate(delays) if d >= retry_after_s), len(delays) - 1)
        wait = max(delays[tier], retry_after_s)
    jitter = (rng or random).random() * policy.jitter * wait
    return RetryPlan(tier, now_ms + int((wait + jitter) * 1000))


def failure_headers(
    headers: RawHeaders,
    origin: Origin,
    failure: Failure,
    plan: RetryPlan | None = None,
    tier_name: str | None = None,
    ref: str | None = None,
) -> ProducerHeaders:
    """The record's headers with this failure recorded (and, for a retry, where and when)."""
    kept: ProducerHeaders = []
    for name, value in headers or ():
        if name in _FAILURE_HEADERS or name in _ORIGIN_HEADERS:
            continue
        kept.append((name, value.encode() if isinstance(value, str) else (value or b"")))
    error = failure.error
    out: ProducerHeaders = [
        *kept,
        (ORIGINAL_TOPIC, origin.topic.encode()),
        (ORIGINAL_PARTITION, str(origin.partition).encode()),
        (ORIGINAL_OFFSET, str(origin.offset).encode()),
        (ORIGINAL_TIMESTAMP, str(origin.timestamp_ms).encode()),
        (DESTINATION, failure.destination.encode()),
        (STAGE, failure.stage.encode()),
        (ERROR_CLASS, type(error).__name__.encode()),
        (ERROR_MESSAGE, str(error)[:1000].encode()),
        (ATTEMPTS, str(failure.attempts).encode()),
        (FIRST_FAILURE, str(failure.first_failure_ms).encode()),
        (LAST_FAILURE, str(failure.now_ms).encode()),
    ]
    if plan is not None:
        out.append((RETRY_TIER, (tier_name or str(plan.tier)).encode()))
        out.append((RETRY_DUE, str(plan.due_ms).encode()))
    if ref is not None:
        out.append((RETRY_REF, ref.encode()))
    return out


def retry_due_ms(headers: dict[str, str], written_ms: int, now_ms: int, policy: RetryPolicy) -> int:
    """When a tier record comes due: its `sluice.retry.due`, never later than the policy allows.

    A due time further out than the policy's longest wait after the record was written
    (a record from an older version, or put in the tier by hand) is brought in to that.
    """
    due = int_header(headers, RETRY_DUE) or 0
    latest = min(written_ms, now_ms) + int(longest_wait_s(policy) * 1000)
    return min(due, latest)
