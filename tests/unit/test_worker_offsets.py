"""The worker's offset bookkeeping: a commit never passes a record nobody processed."""

from __future__ import annotations

from collections import defaultdict

from faust.types import TP
from intervaltree import IntervalTree

from streams.transport import BatchedConsumer

TOPIC = "t.events.ingest"


def _consumer() -> BatchedConsumer:
    """The worker's consumer with just its offset bookkeeping (as Faust initialises it)."""
    consumer = BatchedConsumer.__new__(BatchedConsumer)
    consumer._acked = defaultdict(list)
    consumer._acked_index = defaultdict(set)
    consumer._committed_offset = defaultdict(lambda: None)
    consumer._gap = defaultdict(IntervalTree)
    return consumer


async def test_a_commit_waits_for_the_record_at_the_committed_offset() -> None:
    consumer, tp = _consumer(), TP(TOPIC, 2)
    consumer._committed_offset[tp] = 251  # Kafka's committed offset: the next to process
    consumer._acked[tp] = [252, 253, 254]  # 251 was fetched, then dropped by a rebalance
    assert consumer._new_offset(tp) is None
    consumer._acked[tp].append(251)  # read again and processed
    assert consumer._new_offset(tp) == 255


async def test_a_gap_may_start_at_the_committed_offset() -> None:
    consumer, tp = _consumer(), TP(TOPIC, 0)
    consumer._committed_offset[tp] = 10
    consumer._acked[tp] = [12, 13]
    # Offsets 10 and 11 never arrive, even read again (transaction markers, compaction).
    await consumer._add_gap(tp, 10, 11)
    assert consumer._new_offset(tp) == 14
