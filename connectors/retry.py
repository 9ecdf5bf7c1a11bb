"""Retry decisions: whether a failed record is tried again, in which tier, and when.

A record that failed in a way worth retrying goes to one of its destination's delay
topics (`sluice.dest.<d>.retry.<tier>`) with its due time in `sluice.retry.due`; one
that failed for good, or whose retries are spent, goes to `sluice.dest.<d>.dlq`. The
headers both carry are the failure-header contract of `core/headers.py`. Pure
functions: no Kafka here.
"""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from core.config import RetryPolicy
from core.due import DueRule, clamp_due
from core.headers import RETRY_DUE, RetryPlan, int_header


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


def retry_due_ms(headers: dict[str, str], written_ms: int, now_ms: int, policy: RetryPolicy) -> int:
    """When a tier record comes due: its `sluice.retry.due`, never later than the policy allows.

    A due time further out than the policy's longest wait after the record was written
    (a record from an older version, or put in the tier by hand) is brought in to that.
    """
    return clamp_due(int_header(headers, RETRY_DUE), written_ms, now_ms, _longest_wait_ms(policy))


def retry_due_rule(policy: RetryPolicy) -> DueRule:
    """The due-time rule of a tier's records: `retry_due_ms` for a due-time lane."""
    return DueRule(RETRY_DUE, _longest_wait_ms(policy))


def _longest_wait_ms(policy: RetryPolicy) -> int:
    return int(longest_wait_s(policy) * 1000)
