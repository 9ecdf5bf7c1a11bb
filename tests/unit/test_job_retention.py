"""Retention of finished jobs: when a status expires, and what a sweep takes and writes."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from connectors.jobs.metrics import JobMetrics
from connectors.jobs.retention import COMPACT_AFTER, MAX_PER_SWEEP, Retention, expires_at_ms
from core.config import Queue
from core.errors import BrokerUnavailable
from core.jobs import ACTIVE, COMPLETED, DEAD, JobStatus, StatusTable, idempotent_id

NOW = 1796292000_000
QUEUE = Queue(name="q", submit_keys=("k",), retention_s=2, idempotency_s=5)
P0 = ("jobs.q.p0", 0)
P1 = ("jobs.q.p0", 1)


def status(job_id: str, submitted: int, partition: int = 0, queue: str = "q") -> JobStatus:
    return JobStatus(
        id=job_id,
        queue=queue,
        state="PENDING",
        attempt=1,
        max_attempts=3,
        priority=0,
        topic=f"jobs.{queue}.p0",
        partition=partition,
        submitted_at_ms=submitted,
        updated_at_ms=submitted,
    )


def finished(job_id: str, submitted: int, at: int, partition: int = 0) -> JobStatus:
    return status(job_id, submitted, partition).moved(COMPLETED, at)


class Producer:
    """Records what is sent; fails while `down`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []
        self.down = False

    async def send_batch(
        self, topic: str, records: list[Any], partition: int | None = None
    ) -> None:
        if self.down:
            raise BrokerUnavailable("down")
        self.sent.append((topic, records))


def test_a_status_expires_after_retention_and_a_derived_id_not_before_idempotency() -> None:
    random_id = "0b7d6f5e-94ad-4b40-8d8e-2ae54f0e40e3"
    keyed = idempotent_id("q", "key-1")
    assert expires_at_ms(status(random_id, NOW), QUEUE) is None
    assert expires_at_ms(status(random_id, NOW).moved(ACTIVE, NOW + 1), QUEUE) is None
    assert expires_at_ms(finished(random_id, NOW, NOW + 1000), QUEUE) == NOW + 3000
    # Submitted with a key: max(finished + retention_s, submitted + idempotency_s).
    assert expires_at_ms(finished(keyed, NOW, NOW + 1000), QUEUE) == NOW + 5000
    assert expires_at_ms(finished(keyed, NOW, NOW + 4000), QUEUE) == NOW + 6000
    dead = status(keyed, NOW).moved(DEAD, NOW + 9000)
    assert expires_at_ms(dead, QUEUE) == NOW + 11_000


def test_a_sweep_takes_the_expired_statuses_of_the_owned_partitions_only() -> None:
    table = StatusTable()
    clock = [NOW / 1000]
    retention = Retention(QUEUE, table, "status", clock=lambda: clock[0])
    table.put(finished("a", NOW - 10_000, NOW - 5000, partition=0))
    table.put(finished("b", NOW - 10_000, NOW - 5000, partition=1))
    table.put(finished("c", NOW - 10_000, NOW - 1000, partition=0))  # 1 s left
    table.put(status("d", NOW - 10_000).moved(ACTIVE, NOW - 9000))  # runs: never
    table.put(status("other", NOW - 10_000, queue="x").moved(COMPLETED, NOW - 9000))
    # Put again (the follower read back this process's write): no second entry.
    table.put(finished("a", NOW - 10_000, NOW - 5000, partition=0))
    assert retention.pending() == 3

    assert [s.id for s in retention.expired({P0}, NOW, 100)] == ["a"]
    assert retention.expired({P0}, NOW, 100) == []
    assert sorted(s.id for s in retention.expired({P0, P1}, NOW + 1000, 100)) == ["b", "c"]
    assert retention.pending() == 0


def test_a_status_that_changed_since_is_not_taken() -> None:
    table = StatusTable()
    retention = Retention(QUEUE, table, "status")
    dead = status("a", NOW - 10_000).moved(DEAD, NOW - 5000)
    table.put(dead)
    # Redriven from the DLQ: it runs again, and its old expiry is no longer its own.
    table.put(dead.moved(ACTIVE, NOW - 4000, attempt=1))
    table.forget("gone")
    assert retention.expired({P0}, NOW + 100_000, 100) == []
    table.put(dead.moved(ACTIVE, NOW - 4000).moved(COMPLETED, NOW - 3000))
    assert [s.id for s in retention.expired({P0}, NOW, 100)] == ["a"]


async def test_sweep_writes_tombstones_forgets_them_and_puts_back_what_failed() -> None:
    table = StatusTable()
    metrics = JobMetrics(CollectorRegistry())
    retention = Retention(QUEUE, table, "status", metrics, clock=lambda: NOW / 1000)
    for i in range(3):
        table.put(finished(f"j{i}", NOW - 10_000, NOW - 5000))
    table.put(finished("later", NOW - 10_000, NOW))
    producer: Any = Producer()
    retention.sweep({P0}, None)  # no producer yet: nothing
    assert len(table) == 4
    producer.down = True
    retention.sweep({P0}, producer)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # Not confirmed: back in the table, and swept again next time.
    assert {table.get(f"j{i}") is not None for i in range(3)} == {True}
    producer.down = False
    retention._next_sweep = 0
    retention.sweep({P0}, producer)
    assert table.get("j0") is None  # forgotten at once
    await asyncio.sleep(0)
    assert producer.sent == [("status", [(f"j{i}".encode(), None, None) for i in range(3)])]
    assert [s.id for s in table.select("q", None, 10)] == ["later"]
    assert metrics.expired.labels("q")._value.get() == 3
    # The next sweep waits a second.
    retention.sweep({P0}, producer)
    assert len(producer.sent) == 1


async def test_a_full_sweep_is_followed_by_another_at_once() -> None:
    table = StatusTable()
    retention = Retention(QUEUE, table, "status", clock=lambda: NOW / 1000)
    for i in range(MAX_PER_SWEEP + 5):
        table.put(finished(f"j{i}", NOW - 10_000, NOW - 5000))
    producer: Any = Producer()
    retention.sweep({P0}, producer)
    await asyncio.sleep(0)
    retention.sweep({P0}, producer)
    await asyncio.sleep(0)
    assert [len(records) for _, records in producer.sent] == [MAX_PER_SWEEP, 5]
    assert len(table) == 0


def test_entries_of_statuses_deleted_by_another_process_are_compacted_away() -> None:
    table = StatusTable()
    retention = Retention(QUEUE, table, "status", clock=lambda: NOW / 1000)
    # Partition 1 belongs to another process: its tombstones forget the statuses here,
    # and no sweep of this process takes their entries.
    for i in range(COMPACT_AFTER + 10):
        table.put(finished(f"x{i}", NOW - 10_000, NOW, partition=1))
        table.forget(f"x{i}")
    table.put(finished("kept", NOW - 10_000, NOW, partition=1))
    table.put(finished("mine", NOW - 10_000, NOW, partition=0))
    assert retention.pending() == COMPACT_AFTER + 12
    retention.compact()
    assert retention.pending() == 2
    # What is left is still taken when its partition comes here and its time comes.
    assert sorted(s.id for s in retention.expired({P0, P1}, NOW + 10_000, 100)) == ["kept", "mine"]
