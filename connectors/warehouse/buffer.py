"""The open batch of one partition: its events, the records behind them, what is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Message

from connectors.warehouse.copies import RecentIds, event_key
from core.headers import REPLAY_OF
from core.ranges import in_ranges

# A record that cannot be loaded, and why: for the destination's DLQ.
DeadRecord = tuple[Message, Exception]


@dataclass
class PartitionBuffer:
    """The open batch of one partition."""

    topic: str
    partition: int
    # The rebalance this buffer was made in: records fetched before it are stale.
    epoch: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    # The record each event came from, for its dead letter.
    messages: list[Message] = field(default_factory=list)
    first: int = -1
    last: int = -1
    opened: float = 0.0
    # Set after a restart: the batch must end exactly here to repeat its token.
    pending_end: int | None = None
    # Offset ranges already in the warehouse (a replay skips them), sorted; None while
    # they could not be read (the partition is paused and read again from `start`).
    loaded: list[tuple[int, int]] | None = field(default_factory=list)
    start: int = OFFSET_BEGINNING
    # Records that cannot be decoded: dead-lettered before the batch is committed.
    poison: list[DeadRecord] = field(default_factory=list)
    # Records the warehouse refused, once the batch is loaded (kept across retries of
    # the dead-letter write, so the batch is not loaded again).
    refused: list[DeadRecord] | None = None
    # The event ids this partition loaded lately (`copies.py`).
    recent: RecentIds = field(default_factory=lambda: RecentIds(0))

    def __len__(self) -> int:
        return len(self.events)

    def is_loaded(self, offset: int) -> bool:
        """Whether `offset` is in the warehouse already."""
        return bool(self.loaded) and in_ranges(self.loaded or [], offset)

    def take(self, event: dict[str, Any], msg: Message) -> bool:
        """Add a decoded record to the batch; False (and not added) for a recent copy."""
        key = event_key(str(event["source_id"]), str(event["event_id"]))
        if key in self.recent:
            return False
        self.recent.add(key)
        event["_topic"], event["_partition"], event["_offset"] = (
            msg.topic(),
            msg.partition(),
            msg.offset(),
        )
        self.events.append(event)
        self.messages.append(msg)
        return True

    def reset(self) -> None:
        """Empty the batch once it is committed (the loaded ranges stay)."""
        self.events = []
        self.messages = []
        self.poison = []
        self.refused = None
        self.first = self.last = -1
        self.pending_end = None


def replayed_from(msg: Message) -> tuple[str, int, int] | None:
    """The topic, partition and offset a `sluice replay` copy was made of (its `REPLAY_OF`
    header); None for a record that is not such a copy, or whose header is not readable."""
    headers = msg.headers()
    if not headers:
        return None
    for name, value in headers if isinstance(headers, list) else headers.items():
        if name == REPLAY_OF and value:
            text = value.decode() if isinstance(value, bytes) else value
            head, _, offset = text.rpartition(":")
            topic, _, partition = head.rpartition(":")
            try:
                return topic, int(partition), int(offset)
            except ValueError:
                return None
    return None
