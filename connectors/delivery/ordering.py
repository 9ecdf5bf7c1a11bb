"""Order per key while retrying (`retry.preserve_order`): held records and their release.

While a record of key K waits in a retry tier, K is parked (`connectors/delivery/parking.py`):
later records of K are held behind it, each written to the parked changelog before its
offset is committed. When the head resolves (delivered, or dead-lettered for good), the
held records of K go out one after the other, in order; one that fails and goes to a
tier becomes K's new head and the rest wait behind it again. At most `MAX_RELEASES`
keys are released at once, and the records held in memory are bounded
(`SLUICE_DELIVERY_MAX_HELD_RECORDS`): a lane that must hold one more waits, with its
partition paused, until a release makes room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

from confluent_kafka import Message

from connectors.delivery.metrics import DeliveryMetrics
from connectors.delivery.pacing import Sender
from connectors.delivery.parking import Held, KeyState, ParkedKeys
from connectors.delivery.routing import Routing, durably, now_ms, record_ref, written_ms
from core.due import Lane
from core.headers import Origin, header_map, message_headers, origin_of
from core.settings import DeliverySettings
from core.topics import DestinationTopics
from core.watchdog import StallWatchdog

# Keys released at once (each sends its held records one after the other): a restore that
# brings thousands of keys to release must not open thousands of requests at once.
MAX_RELEASES = 64


class Ordering:
    """The parked keys of one destination, and the tasks that release them."""

    def __init__(
        self,
        parking: ParkedKeys,
        destination: str,
        topics: DestinationTopics,
        settings: DeliverySettings,
        metrics: DeliveryMetrics,
        routing: Routing,
        sender: Sender,
        watchdog: StallWatchdog,
        task_ended: Callable[[asyncio.Task[None]], None],
    ) -> None:
        """`task_ended` is called when a release task ends (one that failed is a bug)."""
        self.parking = parking
        self.destination = destination
        self.topics = topics
        self.settings = settings
        self.metrics = metrics
        self.routing = routing
        self.sender = sender
        self.watchdog = watchdog
        self._task_ended = task_ended
        self.room = asyncio.Event()  # set when held records drop below the bound
        self._releasing = asyncio.Semaphore(MAX_RELEASES)
        self._releases: dict[int, set[asyncio.Task[None]]] = {}
        self._halting: set[int] = set()  # revoked: releases stop at a record boundary
        self._stopped = False  # the delivery stops: every release stops at a record boundary

    def parked(self, partition: int, key: bytes | None) -> KeyState | None:
        """The parked state of `key` (None: not parked, later records of it go on)."""
        return None if key is None else self.parking.get(partition, key)

    async def hold(self, partition: int, key: bytes, msg: Message) -> None:
        """Hold `msg` behind its parked key, written to the changelog."""
        held = self.parking.hold(partition, key, _held(msg, record_ref(msg)))
        await durably(partial(self.parking.persist, partition, key, held))

    async def park(self, partition: int, key: bytes, ref: str, attempts: int) -> None:
        """Park `key` behind the record `ref`, waiting in a tier after `attempts`."""
        await durably(partial(self.parking.park, partition, key, ref, attempts))

    async def room_to_hold(self, lane: Lane[Message], chunk: list[Message]) -> bool:
        """Wait while a record of `chunk` must be held and the held-records bound is reached.

        The lane's partition is paused meanwhile; records of other partitions, retries and
        releases go on, and a release makes room. False when the lane stops first.
        """
        parking = self.parking
        bound = self.settings.max_held_records
        if parking.held_count < bound or not any(
            (key := msg.key()) is not None and parking.get(lane.partition, key) for msg in chunk
        ):
            return True
        lane.blocked = True
        try:
            while parking.held_count >= bound and not lane.stopping:
                self.room.clear()
                await self.room.wait()
        finally:
            lane.blocked = False
        return not lane.stopping

    async def resolved(self, partition: int, key: bytes) -> None:
        """A parked key's head is done: release the records held behind it, in order."""
        await durably(partial(self.parking.head_resolved, partition, key))
        self.start_releases(partition, [key])

    def start_releases(self, partition: int, keys: list[bytes]) -> None:
        """Release the held records of `keys`, each key in a task of its own.

        Once the delivery stops, none starts: the keys' heads are resolved in the changelog,
        so whoever restores the partition next releases them.
        """
        if self._stopped:
            return
        tasks = self._releases.setdefault(partition, set())
        for key in keys:
            task = asyncio.create_task(self._release(partition, key))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(self._task_ended)  # a release that fails is a bug too

    def assigned(self, partitions: set[int]) -> None:
        """Partitions (given back) whose releases may run again."""
        self._halting -= partitions

    def revoking(self, partitions: set[int]) -> list[asyncio.Task[None]]:
        """Partitions being revoked: their releases stop at a record boundary (to wait for)."""
        self._halting |= partitions
        return [t for p in partitions for t in self._releases.pop(p, set())]

    def halt(self) -> list[asyncio.Task[None]]:
        """The delivery stops: every release stops at a record boundary (the tasks to wait for).

        A release in the middle of a request finishes it and writes its outcome, so the
        request is not cut off by the HTTP session closing (a retriable error that would
        send a record the destination may have taken to a tier, to be delivered again).
        What is still held stays in the changelog, and the next owner goes on from there.
        """
        self._stopped = True
        return [t for tasks in self._releases.values() for t in tasks]

    def drop(self, partitions: set[int]) -> None:
        """Forget revoked partitions' state: the next owner restores it from the changelog."""
        for partition in partitions:
            self.parking.drop(partition)
        self.count()

    def count(self) -> None:
        """Update the parked and held gauges; signal room when below the held bound."""
        parking = self.parking
        self.metrics.parked.labels(self.destination).set(len(parking))
        self.metrics.held.labels(self.destination).set(parking.held_count)
        if parking.held_count < self.settings.max_held_records:
            self.room.set()

    def _halted(self, partition: int) -> bool:
        return self._stopped or partition in self._halting

    async def _release(self, partition: int, key: bytes) -> None:
        async with self._releasing:
            await self._release_key(partition, key)

    async def _release_key(self, partition: int, key: bytes) -> None:
        parking = self.parking
        routing = self.routing
        while not self._halted(partition) and (held := parking.next_held(partition, key)):
            headers = header_map(held.headers)
            own = Origin(
                self.topics.main, partition, int(held.ref.split(":")[1]), held.timestamp_ms
            )
            event = await routing.decode_value(key, held.value, held.headers, own)
            error = None if event is None else await self.sender.attempt([event])
            if error is not None:
                moved = await routing.failed(
                    partition,
                    key,
                    held.value,
                    held.headers,
                    origin_of(headers, own),
                    error,
                    1,
                    now_ms(),
                    held.ref,
                )
                if moved:
                    # The held record is the key's new head: the rest waits behind it.
                    await self.park(partition, key, held.ref, 1)
                    await durably(partial(parking.released, partition, key, held))
                    self.count()
                    return
            await durably(partial(parking.released, partition, key, held))
            self.count()
            self.watchdog.progress()
        if self._halted(partition):
            return  # revoked or stopping: the next owner goes on from the changelog
        await durably(partial(parking.freed, partition, key))
        self.count()


def _held(msg: Message, ref: str) -> Held:
    return Held(0, ref, msg.value() or b"", message_headers(msg), written_ms(msg))
