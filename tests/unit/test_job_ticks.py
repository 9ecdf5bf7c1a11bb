"""Schedule ticks: which a new owner fires, and their ids."""

from __future__ import annotations

from core.jobs import next_tick, tick_id, ticks

# 2026-12-03 10:00:00 UTC
T0 = 1796292000_000


def test_ticks_are_the_cron_times_after_a_time_up_to_another() -> None:
    assert ticks("* * * * * *", T0, T0 + 3000, 100) == [T0 + 1000, T0 + 2000, T0 + 3000]
    assert ticks("*/15 * * * *", T0, T0 + 3600_000, 100) == [
        T0 + m * 60_000 for m in (15, 30, 45, 60)
    ]
    assert ticks("* * * * * *", T0, T0 + 500, 100) == []


def test_only_the_latest_ticks_are_kept_when_there_are_more_than_the_limit() -> None:
    found = ticks("* * * * * *", T0, T0 + 1000_000, 5)
    assert found == [T0 + s * 1000 for s in range(996, 1001)]


def test_the_next_tick_and_the_tick_ids() -> None:
    assert next_tick("0 * * * *", T0) == T0 + 3600_000
    assert next_tick("0 * * * *", T0 - 1) == T0
    assert tick_id("q", "s", T0) == tick_id("q", "s", T0)
    assert len({tick_id("q", "s", T0), tick_id("q", "s", T0 + 1), tick_id("q", "t", T0)}) == 3
