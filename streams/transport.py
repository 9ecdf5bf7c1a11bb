"""Faust's Kafka transport with delivery to the agents per fetched batch, not per message.

Faust's consumer hands each fetched message to the topic conductor inside a race
against its flow-control switch (`wait_first(callback(message), suspend_flow.wait())`):
two tasks and an `asyncio.wait` for every message, about 60 µs of the worker's
~160 µs an event on this machine. The race matters: when a rebalance suspends the
flow, delivery must stop at once. Here the race is run once for each batch `getmany`
returned: the batch's messages are delivered in order inside it, and a suspension
cancels the rest of the batch exactly as it cancelled the rest of the messages before
(those are read again from the committed offsets once the rebalance seeks).

Faust acks offsets that a partition skipped as a "gap" (for transaction markers and
compacted offsets), but records it fetched and then dropped while a rebalance began
look the same and would be lost. So a gap is first read again from its start, and
acked only when the records are still not there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka
from faust.types import TP, ConsumerT, Message

_YIELD_EVERY = 100


class BatchedConsumer(aiokafka.Consumer):
    """The aiokafka consumer of Faust, delivering a fetched batch under one flow check."""

    # Per partition, the last delivered offset after which a gap was read again once.
    _probed: dict[TP, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._probed = {}

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                batch = self.getmany(timeout=1.0)
                # getmany can return at once for a long time: let the loop breathe.
                await asyncio.sleep(0)
                if not self.should_stop:
                    await self.wait_first(self._deliver(batch), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise

    async def _deliver(self, batch: AsyncIterator[tuple[TP, Message]]) -> None:
        callback = cast(Callable[[Message], Awaitable[None]], self.callback)
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        reread: set[TP] = set()
        since_yield = 0
        async for tp, message in batch:
            since_yield += 1
            if since_yield > _YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            if tp in reread:
                continue  # this partition is read again from an earlier offset
            offset = message.offset
            last = read_offset[tp]
            if last is not None and offset < last:
                continue  # already delivered (a fetch repeated after a seek)
            if last and offset - last > 1 and acks_enabled_for(message.topic):
                if self._probed.get(tp) != last:
                    # Offsets last+1..offset-1 were fetched but never delivered: Faust drops
                    # what it fetched for partitions it paused while a rebalance began.
                    # Acking them as a gap would lose them: read them again instead.
                    self._probed[tp] = last
                    reread.add(tp)
                    await self._seek(tp, last + 1)
                    continue
                # Read again and still missing: offsets that never arrive (transaction
                # markers, compaction) are acked.
                await self._add_gap(tp, last + 1, offset)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            read_offset[tp] = offset


class BatchedTransport(aiokafka.Transport):
    """`kafka://` with `BatchedConsumer`."""

    Consumer: ClassVar[type[ConsumerT]] = BatchedConsumer


class TransactionalConsumer(BatchedConsumer):
    """For exactly-once: input offsets are committed only inside the output transactions.

    A commit of Faust's own, made at its interval, could land after a later transaction
    and move the group's offset back; the next owner of the partition would then process
    committed outputs again. So Faust's commits are taken as done without writing them:
    its bookkeeping moves on, and Kafka holds the transactions' offsets.
    """

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        return True


class TransactionalTransport(aiokafka.Transport):
    """`kafka://` with `TransactionalConsumer`."""

    Consumer: ClassVar[type[ConsumerT]] = TransactionalConsumer
