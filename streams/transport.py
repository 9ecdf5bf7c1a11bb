"""Faust's Kafka transport with delivery to the agents per fetched batch, not per message.

Faust's consumer hands each fetched message to the topic conductor inside a race
against its flow-control switch (`wait_first(callback(message), suspend_flow.wait())`):
two tasks and an `asyncio.wait` for every message, a large share of the worker's time
an event (BENCHMARKS.md). The race matters: when a rebalance suspends the
flow, delivery must stop at once. Here the race is run once for each batch `getmany`
returned: the batch's messages are delivered in order inside it, and a suspension
cancels the rest of the batch exactly as it cancelled the rest of the messages before
(those are read again from the committed offsets once the rebalance seeks).

For the topics an agent takes in batches (`deliver_in_batches`), the conductor's
per-message step (an `Event` built and queued for every message) is skipped as
well: each partition's share of a fetched batch goes to the subscribing channels'
queues as one list of messages, which `streams.batches.take_batches` reads. Flow control
still gates the hand-over, and a rebalance clears those queues as it clears Faust's.

Faust acks offsets that a partition skipped as a "gap" (for transaction markers and
compacted offsets), but records it fetched and then dropped while a rebalance began
look the same and would be lost. So a gap is first read again from its start, and
acked only when the records are still not there. After a seek the next offset to
deliver is the read offset itself, not the one after it: a record dropped right after a
seek is a gap too. And no commit passes an offset that was neither processed nor found
missing twice (Faust's own bookkeeping let one such record through).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, cast
from weakref import WeakKeyDictionary

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka
from faust.types import TP, AppT, ConsumerT, Message

_YIELD_EVERY = 100
# Lists of messages a channel of such a topic should hold (its `maxsize`) before the
# consumer waits for the agent.
QUEUED_BATCHES = 8
_BATCHED: WeakKeyDictionary[AppT, set[str]] = WeakKeyDictionary()


def deliver_in_batches(app: AppT, topic: str) -> None:
    """Have the consumer hand `topic`'s messages to its channels as lists, not events.

    Only for a topic whose subscribers read their queue with `take_batches`; give its
    channel `maxsize=QUEUED_BATCHES`, as the hand-over waits while a queue is full.
    """
    _BATCHED.setdefault(app, set()).add(topic)


class BatchedConsumer(aiokafka.Consumer):
    """The aiokafka consumer of Faust, delivering a fetched batch under one flow check."""

    # Per partition, the offset from which a gap was read again once.
    _probed: dict[TP, int]
    # Partitions whose read offset names the next offset (set by a seek), not the last
    # one delivered.
    _seeked: set[TP]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._probed = {}
        self._seeked = set()

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                batch = self.getmany(timeout=1.0)
                # getmany can return at once for a long time: let the loop breathe.
                await asyncio.sleep(0)
                if not self.should_stop:
                    await self.wait_first(self._deliver(batch), self.suspend_flow.wait())
                if loop.time() - checked >= 1.0 and self.flow_active:
                    checked = loop.time()
                    await self._read_dropped_tails()
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise

    async def perform_seek(self) -> None:
        """Seek to the committed offsets; each read offset then names the next to read."""
        await super().perform_seek()
        self._seeked = set(self._read_offset)
        self._probed.clear()

    async def seek(self, partition: TP, offset: int) -> None:
        """Seek one partition; its read offset then names the next to read."""
        await super().seek(partition, offset)
        self._seeked.add(partition)
        self._probed.pop(partition, None)

    def _next_expected(self, tp: TP) -> int | None:
        """The offset of `tp` to deliver next, when known."""
        last = self._read_offset.get(tp)
        if last is None:
            return None
        return last if tp in self._seeked else last + 1

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Offsets `offset_from`..`offset_to` never arrive: count them as acked.

        Faust's own version starts a gap no lower than the committed offset plus one, and
        its commit then accepts a first acked offset one past the committed one, so a
        single record at the committed offset could be committed over unprocessed. Here
        the committed offset is what it is in Kafka, the next offset to process: a gap
        may start there, and a commit waits until that offset is acked (`_new_offset`).
        """
        committed = self._committed_offset[tp]
        if committed is not None:
            offset_from = max(offset_from, committed)
        if offset_from <= offset_to:
            gaps = self._gap[tp]
            gaps.addi(offset_from, offset_to + 1)
            gaps.merge_overlaps()

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for `tp`: only past offsets processed or known not to exist."""
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None:
            gaps = self._gap[tp]
            first = min(acked)
            if gaps:
                first = min(first, gaps.begin())
            if first > committed:
                return None  # the record at the committed offset is not processed yet
        offset: int | None = super()._new_offset(tp)
        return offset

    async def _read_dropped_tails(self) -> None:
        """Read again what the client fetched for a partition but was never delivered.

        A gap shows when a later record arrives; records dropped at the end of what a
        partition holds show nowhere, and the partition would stay behind for good (seen
        when a worker took over a backlog while it was busy). Between batches, a
        partition whose fetch position is past the next offset to deliver is read again
        from there once; if it is still past it after that, those offsets never arrive
        (transaction markers, compaction) and are acked.
        """
        assignment = self._thread._ensure_consumer()._subscription.subscription.assignment
        if assignment is None:
            return
        read_offset = self._read_offset
        for tp in list(self._get_active_partitions()):
            expected = self._next_expected(tp)
            state = assignment.state_value(tp)
            if expected is None or state is None or not state.has_valid_position:
                continue
            if state.position <= expected or not self.app.topics.acks_enabled_for(tp.topic):
                continue
            if self._probed.get(tp) != expected:
                self.log.warning(
                    "Reading %r again from %r: fetched up to %r, never delivered",
                    tp,
                    expected,
                    state.position,
                )
                self._probed[tp] = expected
                await self._seek(tp, expected)
            else:
                await self._add_gap(tp, expected, state.position - 1)
                read_offset[tp] = state.position - 1
                self._seeked.discard(tp)

    async def _hand_over(self, pending: dict[TP, list[Message]]) -> None:
        """Queue each partition's messages as one list on the channels subscribing to it."""
        await self.app.flow_control.acquire()
        index = cast(Any, self.app.topics)._tp_index
        for tp, messages in pending.items():
            channels = index.get(tp)
            if not channels:
                continue  # no longer assigned here: its new owner reads it from the commit
            if len(channels) > 1:
                for message in messages:
                    message.incref(len(channels))
            for channel in channels:
                await channel.queue.put(messages)

    async def _deliver(self, batch: AsyncIterator[tuple[TP, Message]]) -> None:
        callback = cast(Callable[[Message], Awaitable[None]], self.callback)
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        batched = _BATCHED.get(self.app, set())
        pending: dict[TP, list[Message]] = {}
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
            expected = self._next_expected(tp)
            if expected is not None and offset < expected:
                continue  # already delivered (a fetch repeated after a seek)
            if expected is not None and offset > expected and acks_enabled_for(message.topic):
                if self._probed.get(tp) != expected:
                    # Offsets expected..offset-1 were fetched but never delivered: Faust
                    # drops what it fetched for partitions it paused while a rebalance
                    # began, also the first record after a seek. Acking them as a gap
                    # would lose them: read them again instead.
                    self._probed[tp] = expected
                    reread.add(tp)
                    await self._seek(tp, expected)
                    continue
                # Read again and still missing: offsets that never arrive (transaction
                # markers, compaction) are acked.
                await self._add_gap(tp, expected, offset - 1)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            if tp.topic in batched:
                queued = pending.get(tp)
                if queued is None:
                    queued = pending[tp] = []
                queued.append(message)
            else:
                await callback(message)
            read_offset[tp] = offset
            self._seeked.discard(tp)
        if pending:
            await self._hand_over(pending)


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
