"""Retry plans and failure headers: pure logic, no broker."""

from __future__ import annotations

import math
import random

import pytest

from connectors.errors import DestinationUnavailable
from connectors.retry import parse_retry_after, plan_retry, retry_due_ms
from core.config import RetryPolicy
from core.errors import ConfigError
from core.headers import Failure, Origin, RetryPlan, failure_headers, header_map, origin_of
from tests.configs import Configs

NOW = 1_800_000_000_000
POLICY = RetryPolicy(tiers=("5s", "1m", "10m"), max_attempts=5, jitter=0.1)


@pytest.mark.parametrize(
    ("attempts", "tier", "delay_s"),
    [(1, 0, 5), (2, 1, 60), (3, 2, 600), (4, 2, 600)],
)
def test_the_nth_failure_waits_in_the_nth_tier_with_jitter_on_top(
    attempts: int, tier: int, delay_s: float
) -> None:
    rng = random.Random(7)
    dues = []
    for _ in range(200):
        plan = plan_retry(POLICY, attempts, NOW, NOW, rng=rng)
        assert plan is not None
        assert plan.tier == tier
        dues.append(plan.due_ms - NOW)
    # Never earlier than the tier's delay, never later than 10% on top; spread out.
    assert min(dues) >= delay_s * 1000
    assert max(dues) <= delay_s * 1100
    assert len(set(dues)) > 100


def test_given_up_only_when_attempts_and_age_are_both_spent() -> None:
    policy = RetryPolicy(tiers=("1s", "3s"), max_attempts=3, max_age_s=60, jitter=0)
    # Three attempts, but the first failure is only 10 s old: keep trying at the last tier.
    assert plan_retry(policy, 3, NOW - 10_000, NOW) == RetryPlan(1, NOW + 3000)
    # Old enough, but attempts left: keep trying.
    assert plan_retry(policy, 2, NOW - 120_000, NOW) == RetryPlan(1, NOW + 3000)
    # Both spent: give up.
    assert plan_retry(policy, 3, NOW - 60_000, NOW) is None
    # The default age limit is 0: max_attempts alone decides.
    assert plan_retry(RetryPolicy(max_attempts=2), 2, NOW, NOW) is None


def test_retry_after_picks_a_tier_at_least_that_long_and_is_never_early() -> None:
    policy = RetryPolicy(tiers=("5s", "1m", "10m"), jitter=0)
    assert plan_retry(policy, 1, NOW, NOW, retry_after_s=2) == RetryPlan(0, NOW + 5000)
    assert plan_retry(policy, 1, NOW, NOW, retry_after_s=30) == RetryPlan(1, NOW + 60_000)
    # Longer than every tier: the last one, due when the destination asked.
    assert plan_retry(policy, 1, NOW, NOW, retry_after_s=900) == RetryPlan(2, NOW + 900_000)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 2.5 ", 2.5),
        ("-5", 0.0),
        ("inf", math.inf),
        ("1e400", math.inf),
        ("99999999999", 99_999_999_999.0),
        ("nan", None),
        ("", None),
        (None, None),
        ("soon", None),
        ("\u00ff\u0000", None),
        # HTTP-dates: in the past means now; far out is taken as asked (the policy caps it).
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Fri, 15 Jan 2027 08:00:30 GMT", 30.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253_402_300_799.0 - NOW / 1000),
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),
        ("Mon, 32 Foo 2026 99:99:99 GMT", None),
    ],
)
def test_retry_after_is_read_as_seconds_or_a_date_and_junk_is_ignored(
    header: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(header, now_s=NOW / 1000) == seconds


@pytest.mark.parametrize(
    "retry_after_s",
    [math.inf, -math.inf, math.nan, -5.0, 99_999_999_999.0, 1e308, 10**30],
)
def test_an_absurd_retry_after_is_capped_by_the_policy_never_a_crash(retry_after_s: float) -> None:
    policy = RetryPolicy(tiers=("1s", "5s"), jitter=0)
    plan = plan_retry(policy, 1, NOW, NOW, retry_after_s=retry_after_s)
    assert plan is not None
    # Never before the tier's delay, never after the default cap of an hour.
    assert NOW + 1000 <= plan.due_ms <= NOW + 3_600_000
    capped = RetryPolicy(tiers=("1s", "5s"), jitter=0.5, max_retry_after_s=60)
    plan = plan_retry(capped, 1, NOW, NOW, retry_after_s=retry_after_s)
    assert plan is not None
    assert NOW + 1000 <= plan.due_ms <= NOW + 90_000


def test_a_retry_after_up_to_the_cap_is_honoured() -> None:
    policy = RetryPolicy(tiers=("1s", "5s"), jitter=0, max_retry_after_s=120)
    assert plan_retry(policy, 1, NOW, NOW, retry_after_s=90) == RetryPlan(1, NOW + 90_000)
    assert plan_retry(policy, 1, NOW, NOW, retry_after_s=900) == RetryPlan(1, NOW + 120_000)
    # A cap below the last tier: the tier's own delay still holds.
    short = RetryPolicy(tiers=("1s", "5s"), jitter=0, max_retry_after_s=2)
    assert plan_retry(short, 1, NOW, NOW, retry_after_s=math.inf) == RetryPlan(1, NOW + 5000)
    with pytest.raises(ValueError, match="max_retry_after_s"):
        RetryPolicy(max_retry_after_s=math.inf)


def test_a_due_time_further_out_than_the_policy_allows_is_brought_in() -> None:
    policy = RetryPolicy(tiers=("1s", "5s"), jitter=0.1, max_retry_after_s=60)
    written = NOW - 2000
    assert retry_due_ms({"sluice.retry.due": str(NOW + 3000)}, written, NOW, policy) == NOW + 3000
    for junk in (str(10**30), "99999999999999", "x", "-7"):
        due = retry_due_ms({"sluice.retry.due": junk}, written, NOW, policy)
        assert due <= written + 66_000
    # A record claiming to be written in the future is measured from now.
    far = retry_due_ms({"sluice.retry.due": str(10**20)}, NOW + 10**12, NOW, policy)
    assert far == NOW + 66_000


def test_tiers_must_grow(
    configs: Configs,
) -> None:
    with pytest.raises(ConfigError, match="retry tiers must grow"):
        configs.model(configs.warehouse(retry={"tiers": ["1m", "5s"]}))


def test_failure_headers_keep_the_first_origin_and_history_and_replace_the_last_failure() -> None:
    first = Origin("p.dest.hook", 2, 117, NOW - 5000)
    failure = Failure("hook", "delivery", DestinationUnavailable("HTTP 503: busy"), 1, NOW, NOW)
    moved = failure_headers(
        [("trace", b"abc"), ("sluice.redrive.count", b"1")],
        first,
        failure,
        RetryPlan(0, NOW + 5000),
        "5s",
        "2:117",
    )
    h = header_map(moved)
    assert h == {
        "trace": "abc",
        "sluice.redrive.count": "1",
        "sluice.original.topic": "p.dest.hook",
        "sluice.original.partition": "2",
        "sluice.original.offset": "117",
        "sluice.original.timestamp": str(NOW - 5000),
        "sluice.destination": "hook",
        "sluice.stage": "delivery",
        "sluice.error.class": "DestinationUnavailable",
        "sluice.error.message": "HTTP 503: busy",
        "sluice.reason": "HTTP 503: busy",
        "sluice.attempts": "1",
        "sluice.first.failure": str(NOW),
        "sluice.last.failure": str(NOW),
        "sluice.retry.tier": "5s",
        "sluice.retry.due": str(NOW + 5000),
        "sluice.retry.ref": "2:117",
    }
    # Failing again from the tier topic: the origin stays the destination topic's record,
    # each header appears once, the retry headers go when the record is given up.
    here = Origin("p.dest.hook.retry.5s", 2, 9, NOW)
    again = Failure("hook", "delivery", DestinationUnavailable("HTTP 500"), 2, NOW, NOW + 6000)
    final = failure_headers(moved, origin_of(h, here), again)
    names = [name for name, _ in final]
    assert len(names) == len(set(names))
    fh = header_map(final)
    assert (fh["sluice.original.topic"], fh["sluice.original.offset"]) == ("p.dest.hook", "117")
    assert (fh["sluice.attempts"], fh["sluice.error.message"]) == ("2", "HTTP 500")
    assert fh["sluice.last.failure"] == str(NOW + 6000)
    assert "sluice.retry.due" not in fh
    assert fh["sluice.redrive.count"] == "1"
