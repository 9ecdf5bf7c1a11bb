"""Retention of finished jobs: their statuses are deleted from the status topic in time.

A finished job's status (COMPLETED, DEAD, CANCELLED) expires `retention_s` after it
finished; a job whose id is derived from a key (an idempotency key, a schedule tick) keeps
it at least `idempotency_s` after it was submitted, so while the status is there a
submit of the same key is that job again and does not run:

    expires = max(finished + retention_s, submitted + idempotency_s)   # derived ids
    expires = finished + retention_s                                   # random ids

Then the worker that owns the partition the job is on (the status's topic and partition)
writes a tombstone (the job id, no value) to the compacted status topic: every follower
forgets the job (the gateway answers 404), and compaction drops its records. After that
the same idempotency key submits a new run of the job, under the same id.

`Retention` keeps the expiry of every finished status of its queue in a heap per
partition, fed by the status table's changes (`StatusTable.watch`), so a sweep looks only
at what is due on the partitions the process owns: at most `MAX_PER_SWEEP` statuses,
every `SWEEP_EVERY_S` (at once again while a sweep was full). The worker's loop calls
`sweep` each turn; the tombstones are written by a task of their own. Entries of
statuses that went or changed since (deleted by the owner of another partition,
redriven) are dropped when they are taken, or by `compact` once they outnumber the live
ones. A status whose tombstone was not confirmed goes back into the table and is swept
again; one whose tombstone was confirmed and that comes back (the follower read the old
record late) is swept again too, which only writes another tombstone.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection

import structlog

from connectors.jobs.metrics import JobMetrics
from core.config import Queue
from core.jobs import JobStatus, StatusTable, derived_id
from core.producer import EventProducer

log = structlog.get_logger("sluice.jobs")

TP = tuple[str, int]
SWEEP_EVERY_S = 1.0
MAX_PER_SWEEP = 1000
# A partition's heap is compacted when it holds this many more entries than twice the
# statuses they are still for.
COMPACT_AFTER = 1000


def expires_at_ms(status: JobStatus, queue: Queue) -> int | None:
    """When `status` is deleted: None while the job is not finished."""
    if not status.finished:
        return None
    at = status.updated_at_ms + int(queue.retention_s * 1000)
    if derived_id(status.id):
        at = max(at, status.submitted_at_ms + int(queue.idempotency_s * 1000))
    return at


class Retention:
    """Deletes the expired statuses of one queue's partitions that this process owns."""

    def __init__(
        self,
        queue: Queue,
        table: StatusTable,
        topic: str,
        metrics: JobMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.table = table
        self.topic = topic
        self.metrics = metrics
        self._clock = clock
        # Per partition: (expires at ms, job id, the status's updated_at_ms), soonest first,
        # and how many of them are still the job's status (the rest went or changed since).
        self._due: dict[TP, list[tuple[int, str, int]]] = {}
        self._live: Counter[TP] = Counter()
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._task: asyncio.Task[None] | None = None
        table.watch(self._changed)

    def _changed(self, old: JobStatus | None, new: JobStatus | None) -> None:
        # Called under the table's lock: no call back into the table from here.
        if new is not None and not new.finished and (old is None or not old.finished):
            return  # nothing finished before or after: nothing to keep or to drop
        name = self.queue.name
        if (
            old is not None
            and new is not None
            and old.finished
            and old.updated_at_ms == new.updated_at_ms
        ):
            return  # the same status again (this process's own write read back)
        at = expires_at_ms(new, self.queue) if new is not None and new.queue == name else None
        with self._lock:
            if old is not None and old.finished and old.queue == name:
                self._live[(old.topic, old.partition)] -= 1
            if new is not None and at is not None:
                tp = (new.topic, new.partition)
                heapq.heappush(self._due.setdefault(tp, []), (at, new.id, new.updated_at_ms))
                self._live[tp] += 1

    def pending(self) -> int:
        """How many finished statuses wait for their time (stale entries included)."""
        with self._lock:
            return sum(len(heap) for heap in self._due.values())

    def expired(self, assigned: Collection[TP], now_ms: int, limit: int) -> list[JobStatus]:
        """Up to `limit` statuses of `assigned` partitions whose time has come, taken off
        the index (an entry whose status changed or went since is dropped)."""
        taken: list[tuple[TP, str, int]] = []
        with self._lock:
            for tp in assigned:
                heap = self._due.get(tp)
                while heap and heap[0][0] <= now_ms and len(taken) < limit:
                    _, job_id, updated = heapq.heappop(heap)
                    taken.append((tp, job_id, updated))
        return [s for tp, job_id, updated in taken if (s := self._valid(tp, job_id, updated))]

    def _valid(self, tp: TP, job_id: str, updated: int) -> JobStatus | None:
        """The job's status if it is still the finished one an entry was made for."""
        status = self.table.get(job_id)
        if (
            status is not None
            and status.finished
            and status.updated_at_ms == updated
            and (status.topic, status.partition) == tp
        ):
            return status
        return None

    def compact(self) -> None:
        """Drop the entries of statuses gone or changed from a partition's heap once they are
        most of it: the tombstones of other processes' partitions leave entries here that
        no sweep of this process takes."""
        with self._lock:
            bloated = [
                tp
                for tp, heap in self._due.items()
                if len(heap) > 2 * self._live[tp] + COMPACT_AFTER
            ]
            taken = {tp: self._due.pop(tp) for tp in bloated}
        for tp, heap in taken.items():
            kept = [entry for entry in heap if self._valid(tp, entry[1], entry[2]) is not None]
            with self._lock:
                # Entries made meanwhile are in the new heap: the two together.
                merged = kept + self._due.get(tp, [])
                heapq.heapify(merged)
                self._due[tp] = merged

    def sweep(self, assigned: Collection[TP], producer: EventProducer | None) -> None:
        """From the worker's loop: start a sweep when one is due and none is under way."""
        if producer is None or (self._task is not None and not self._task.done()):
            return
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        self.compact()
        statuses = self.expired(assigned, int(self._clock() * 1000), MAX_PER_SWEEP)
        if not statuses:
            return
        if len(statuses) >= MAX_PER_SWEEP:
            self._next_sweep = now  # more are due: the next sweep follows this one
        # Forgotten here at once: a submit of the same key read from now on is a new run
        # (its status is written after the tombstone, by the same producer).
        for status in statuses:
            self.table.forget(status.id)
        self._task = asyncio.ensure_future(self._remove(statuses, producer))

    async def _remove(self, statuses: list[JobStatus], producer: EventProducer) -> None:
        tombstones = [(s.id.encode(), None, None) for s in statuses]
        try:
            await producer.send_batch(self.topic, tombstones)
        except Exception as exc:  # unconfirmed, for whatever reason: kept for the next sweep
            # Back into the table (and the index): the next sweep tries again.
            for status in statuses:
                if status.id not in self.table:
                    self.table.put(status)
            log.warning(
                "job statuses not deleted; again later",
                queue=self.queue.name,
                count=len(statuses),
                error=str(exc),
            )
            return
        if self.metrics is not None:
            self.metrics.expired.labels(self.queue.name).inc(len(statuses))
        log.debug("job statuses deleted", queue=self.queue.name, count=len(statuses))
