"""A queue's figures kept from the status table's changes: counts, rates, percentiles."""

from __future__ import annotations

from core.follower import Entry
from core.job_stats import QueueFigures, first_new, percentiles
from core.jobs import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    DEAD,
    FAILED,
    SCHEDULED,
    JobStatus,
    StatusTable,
)

NOW = 1796292000_000


def job(job_id: str, submitted: int, queue: str = "q") -> JobStatus:
    return JobStatus(
        id=job_id,
        queue=queue,
        state="PENDING",
        attempt=1,
        max_attempts=3,
        priority=0,
        topic=f"jobs.{queue}.p0",
        partition=0,
        submitted_at_ms=submitted,
        updated_at_ms=submitted,
    )


def table_at(now_ms: int) -> tuple[StatusTable, QueueFigures]:
    table = StatusTable()
    figures = QueueFigures(clock_ms=lambda: now_ms)
    table.watch(figures.changed)
    return table, figures


def run(
    table: StatusTable, status: JobStatus, start: int, end: int, state: str, attempt: int = 1
) -> JobStatus:
    """An attempt started at `start` and ended at `end` in `state`, each status put."""
    active = status.moved(ACTIVE, start, attempt=attempt, worker="w", lease_until_ms=start + 30_000)
    table.put(active)
    # A lease extension is the same history again.
    table.put(active)
    changes = {"due_ms": end + 100} if state == FAILED else {}
    ended = active.moved(state, end, **changes)
    table.put(ended)
    return ended


def test_counts_rates_and_percentiles_follow_the_statuses_put() -> None:
    table, figures = table_at(NOW)
    # 10 jobs submitted 10 s ago, each waited 100*i ms and ran 1000 + 10*i ms.
    for i in range(10):
        submitted = NOW - 10_000
        start = submitted + 100 * i
        run(table, job(f"j{i}", submitted), start, start + 1000 + 10 * i, COMPLETED)
    # One failed once, then completed: two attempts; the second waited for its due time.
    failed = run(table, job("f", NOW - 5000), NOW - 5000, NOW - 4000, FAILED)
    assert failed.due_ms == NOW - 3900
    run(table, failed, NOW - 3800, NOW - 3000, DEAD, attempt=2)
    # Submitted 2 minutes ago: not in the rates, its attempt in the latencies.
    run(table, job("old", NOW - 120_000), NOW - 119_000, NOW - 118_000, COMPLETED)
    # Scheduled: it waits from its due time, not from when it was submitted.
    scheduled = job("s", NOW - 9000).moved(SCHEDULED, NOW - 9000, due_ms=NOW - 2000)
    table.put(scheduled)
    run(table, scheduled, NOW - 1500, NOW - 1400, COMPLETED)

    assert table.counts("q") == {
        "PENDING": 0,
        "SCHEDULED": 0,
        "ACTIVE": 0,
        "FAILED": 0,
        "COMPLETED": 12,
        "DEAD": 1,
        "CANCELLED": 0,
    }
    summary = figures.summary("q")
    rates = summary["rates"]
    assert rates["window_s"] == 60
    assert round(rates["submitted"] * 60) == 12
    assert round(rates["started"] * 60) == 13
    assert round(rates["completed"] * 60) == 11
    assert round(rates["failed"] * 60) == 1
    assert round(rates["dead"] * 60) == 1
    latency = summary["latency"]
    assert latency["attempts"] == 14
    waits = sorted([100 * i for i in range(10)] + [0, 100, 1000, 500])
    runs = sorted([1000 + 10 * i for i in range(10)] + [1000, 800, 1000, 100])
    assert latency["wait_ms"] == percentiles(waits)
    assert latency["run_ms"] == percentiles(runs)
    assert latency["run_ms"]["p50"] == 1020
    assert latency["wait_ms"]["p99"] == 1000

    # A minute later the rates are empty; the latencies look back 5 minutes.
    later = figures.summary("q", NOW + 61_000)
    assert all(later["rates"][k] == 0 for k in ("submitted", "started", "completed"))
    assert later["latency"]["attempts"] == 14
    assert figures.summary("q", NOW + 300_000)["latency"]["attempts"] == 0
    assert figures.summary("other")["latency"]["wait_ms"] == {"p50": None, "p90": None, "p99": None}


def test_a_tombstone_forgets_the_job_and_the_counts_follow() -> None:
    table, figures = table_at(NOW)
    done = run(table, job("a", NOW - 2000), NOW - 2000, NOW - 1000, COMPLETED)
    cancelled = job("b", NOW - 500).moved(CANCELLED, NOW - 400)
    table.apply(Entry(b"b", cancelled.to_bytes(), 0, 0))
    assert table.counts("q")[COMPLETED] == 1
    assert table.counts("q")[CANCELLED] == 1
    table.apply(Entry(b"a", None, 0, 1))
    table.apply(Entry(b"b", None, 0, 2))
    table.apply(Entry(b"zzz", None, 0, 3))  # a tombstone of a job never seen
    assert table.get("a") is None
    assert len(table) == 0
    assert set(table.counts("q").values()) == {0}
    # What happened in the window still happened.
    assert round(figures.summary("q")["rates"]["completed"] * 60) == 1
    assert round(figures.summary("q")["rates"]["cancelled"] * 60) == 1
    # The same status read again later (the follower, after this process put it) adds
    # nothing; the job submitted anew after its tombstone is a new submit.
    table.put(done)
    table.apply(Entry(b"a", done.to_bytes(), 0, 4))
    assert round(figures.summary("q")["rates"]["submitted"] * 60) == 3
    assert figures.summary("q")["latency"]["attempts"] == 2


def test_new_transitions_are_found_after_the_history_was_cut() -> None:
    status = job("a", NOW)
    for i in range(150):
        status = status.moved(FAILED if i % 2 else ACTIVE, NOW + i, attempt=1 + i // 2)
    assert len(status.history) == 100
    later = status.moved(ACTIVE, NOW + 200, attempt=77)
    assert first_new(status, later) == 99
    assert later.history[first_new(status, later) :] == (later.history[-1],)
    assert first_new(None, later) == 0
    # An older record of the job (read back late): nothing new.
    assert first_new(later, status) == len(status.history)


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7}
