"""Restoring the parked keys of a partition beside the poll loop, once it is assigned.

In order-preserving mode a newly assigned partition's parked state must be in before
any of its records is handled. Its changelog may be long, so it is read on a thread
pool (partitions side by side: a long changelog holds up only its own partition), never
in the rebalance callback, where a long read would hold up polling and the group. The
partition stays paused in every topic of the destination until the read is done;
records of it fetched before the pause took effect are set aside and read again from
where they were (`rewind`). A revoke gives the read up.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import structlog
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from connectors.delivery.metrics import DeliveryMetrics
from connectors.delivery.ordering import Ordering
from connectors.delivery.parking import ParkedKeys, Restored
from core.due import TP
from core.watchdog import StallWatchdog

log = structlog.get_logger("sluice.delivery")
RESTORE_THREADS = 4


class Restores:
    """The partitions whose parked changelog is being read, and the reads."""

    def __init__(
        self,
        parking: ParkedKeys,
        ordering: Ordering,
        loop: asyncio.AbstractEventLoop,
        destination: str,
        metrics: DeliveryMetrics,
        watchdog: StallWatchdog,
        task_ended: Callable[[asyncio.Task[None]], None],
    ) -> None:
        """`task_ended` is called when a restore task ends (one that failed is a bug)."""
        self.parking = parking
        self.ordering = ordering
        self.loop = loop
        self.destination = destination
        self.metrics = metrics
        self.watchdog = watchdog
        self._task_ended = task_ended
        # Partitions being read, each with the flag that gives the read up; records of them
        # fetched meanwhile are read again from `_rewind`.
        self._restoring: dict[int, threading.Event] = {}
        self._lock = threading.Lock()  # rebalance callbacks run on another thread
        self._tasks: set[asyncio.Task[None]] = set()
        self._rewind: dict[TP, int] = {}
        self._pool = ThreadPoolExecutor(
            RESTORE_THREADS, thread_name_prefix=f"restore-{destination}"
        )

    def begin(self, partitions: set[int], pause: Callable[[list[int]], None]) -> None:
        """Assigned `partitions`: `pause` those without parked state, and read it for them.

        Called in the rebalance callback; the reads start on the event loop.
        """
        with self._lock:
            new = sorted(partitions - self.parking.partitions() - set(self._restoring))
            if not new:
                return
            pause(new)
            for partition in new:
                self._restoring[partition] = threading.Event()
        self.metrics.restoring.labels(self.destination).set(len(self._restoring))
        self.loop.call_soon_threadsafe(self._start, new)

    def revoked(self, tps: set[TP]) -> None:
        """Give up the reads of revoked partitions, and forget their rewinds."""
        for tp in tps:
            self._rewind.pop(tp, None)
        with self._lock:
            for partition in {p for _, p in tps}:
                if (cancelled := self._restoring.pop(partition, None)) is not None:
                    cancelled.set()
        self.metrics.restoring.labels(self.destination).set(len(self._restoring))

    def restoring(self) -> set[int]:
        """The partitions being read now."""
        with self._lock:
            return set(self._restoring)

    def set_aside(self, msg: Message) -> bool:
        """True for a record of a partition being restored: it is read again afterwards."""
        partition = msg.partition() or 0
        if partition not in self._restoring:
            return False
        tp = (msg.topic() or "", partition)
        offset = msg.offset() or 0
        self._rewind[tp] = min(self._rewind.get(tp, offset), offset)
        return True

    def rewind(self, consumer: Consumer, restoring: set[int]) -> set[TP]:
        """Seek restored partitions back to their set-aside records; those still to seek.

        A partition stays paused until it is read again from there.
        """
        for tp in [tp for tp in self._rewind if tp[1] not in restoring]:
            try:
                consumer.seek(TopicPartition(tp[0], tp[1], self._rewind[tp]))
            except KafkaException as exc:
                log.warning("seek failed; trying again", partition=tp, error=str(exc))
                continue
            del self._rewind[tp]
        return set(self._rewind)

    async def close(self) -> None:
        """Give every read up and wait for the tasks (the delivery stops)."""
        with self._lock:
            for cancelled in self._restoring.values():
                cancelled.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, partitions: list[int]) -> None:
        for partition in partitions:
            task = asyncio.create_task(self._restore(partition))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(self._task_ended)

    async def _restore(self, partition: int) -> None:
        """Read a partition's parked state off the poll loop, then let it flow again."""
        parking = self.parking
        delay = 1.0
        while (cancelled := self._restoring.get(partition)) is not None:
            try:
                restored: Restored = await self.loop.run_in_executor(
                    self._pool,
                    partial(parking.read, partition, cancelled, self.watchdog.progress),
                )
            except (RuntimeError, TimeoutError, KafkaException) as exc:
                log.warning(
                    "restoring parked keys failed; retrying",
                    destination=self.destination,
                    partition=partition,
                    error=str(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if restored is None or self._restoring.get(partition) is not cancelled:
                break  # revoked meanwhile (and maybe assigned again: read again)
            to_release = parking.install(partition, restored)
            with self._lock:
                del self._restoring[partition]  # the next flow resumes it
            self.metrics.restoring.labels(self.destination).set(len(self._restoring))
            self.ordering.count()
            log.info(
                "parked keys restored",
                destination=self.destination,
                partition=partition,
                keys=len(restored[0]),
            )
            if to_release:
                self.ordering.start_releases(partition, to_release)
            break
