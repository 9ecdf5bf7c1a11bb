"""Faust's Kafka transport with delivery to the agents per fetched batch, not per message.

Faust's consumer hands each fetched message to the topic conductor inside a race
against its flow-control switch (`wait_first(callback(message), suspend_flow.wait())`):
two tasks and an `asyncio.wait` for every message, about 60 µs of the worker's
~160 µs an event on this machine. The race matters: when a rebalance suspends the
flow, delivery must stop at once. Here the race is run once for each batch `getmany`
returned: the batch's messages are delivered in order inside it, and a suspension
cancels the rest of the batch exactly as it cancelled the rest of the messages before
(those are read again from the committed offsets once the rebalance seeks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka
from faust.types import TP, ConsumerT, Message

_YIELD_EVERY = 100


class BatchedConsumer(aiokafka.Consumer):
    """The aiokafka consumer of Faust, delivering a fetched batch under one flow check."""

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
        since_yield = 0
        async for tp, message in batch:
            since_yield += 1
            if since_yield > _YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
            last = read_offset[tp]
            if last is not None and offset < last:
                continue  # already delivered (a fetch repeated after a seek)
            if last and offset - last > 1 and acks_enabled_for(message.topic):
                # Offsets that never arrive (transaction markers, compaction) are acked.
                await self._add_gap(tp, last + 1, offset)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            read_offset[tp] = offset


class BatchedTransport(aiokafka.Transport):
    """`kafka://` with `BatchedConsumer`."""

    Consumer: ClassVar[type[ConsumerT]] = BatchedConsumer
