"""The event ids a sink loaded lately, per partition: later copies of them are dropped.

A copy of an event reaches a destination topic at a new offset when the worker processes
it again after a crash or a rebalance (at least once), or when a client sends it again
after a lost answer (the same `messageId`). Every copy has the event's key, so it lands on
the same partition as the first one; the sink of that partition remembers the last
`copy_window` (source, event id) pairs it took and drops a record whose pair it has seen.
So a plain `SELECT count()` counts each event once in every table, without `FINAL`, for
copies within the window. A partition's window is read from the raw table when the
partition is assigned: the events of the `copy_window` records before its committed
offset, so a restarted sink, or the next owner after a rebalance, knows what was loaded
before it, and a batch left pending by a crash (at and after the committed offset) is
rebuilt exactly as it was. One read serves all partitions of a topic that an assignment
brings; it scans three columns of the raw table (`_offset` is not in its sorting key).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from connectors.warehouse.clickhouse import Warehouse

# "source_id NUL event_id": one string, which the garbage collector does not track (a
# window of tuples made every collection walk them: the layout path, which allocates many
# containers, ran 20 % slower with a full window of tuples).
EventKey = str


def event_key(source_id: str, event_id: str) -> EventKey:
    """The key of an event in a window (source ids cannot hold a NUL)."""
    return f"{source_id}\x00{event_id}"


class RecentIds:
    """At most `size` event keys, the oldest forgotten first; `size` 0 remembers nothing.

    A set answers the lookups and a deque keeps the order: forgetting the oldest is O(1)
    (a dict's first key is not, once many keys were deleted before it).
    """

    def __init__(self, size: int, keys: Iterable[EventKey] = ()) -> None:
        self.size = size
        self._keys: set[EventKey] = set()
        self._order: deque[EventKey] = deque()
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: EventKey) -> bool:
        return key in self._keys

    def add(self, key: EventKey) -> None:
        if self.size <= 0 or key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.size:
            self._keys.discard(self._order.popleft())


def recent_event_ids(
    warehouse: Warehouse, table: str, topic: str, starts: dict[int, int], window: int
) -> dict[int, list[EventKey]]:
    """The keys of the rows `topic` put in `table` from the `window` records before each
    partition's start offset (`starts`: partition -> committed offset), oldest first.

    A partition with no committed offset (negative) has loaded nothing in this group.
    """
    found: dict[int, list[EventKey]] = {p: [] for p in starts}
    begun = {p: s for p, s in starts.items() if s > 0}
    if window <= 0 or not begun:
        return found
    parts = sorted(begun)
    rows = warehouse.rows(
        "SELECT _partition, source_id, event_id FROM {table:Identifier} "
        "WHERE _topic = {t:String} AND has({parts:Array(UInt32)}, _partition) "
        "AND _offset < {ends:Array(UInt64)}[indexOf({parts:Array(UInt32)}, _partition)] "
        "AND _offset >= {lows:Array(UInt64)}[indexOf({parts:Array(UInt32)}, _partition)] "
        "ORDER BY _partition, _offset",
        {
            "table": table,
            "t": topic,
            "parts": parts,
            "ends": [begun[p] for p in parts],
            "lows": [max(0, begun[p] - window) for p in parts],
        },
        "reading recent event ids",
    )
    for partition, source, event in rows:
        found[int(partition)].append(event_key(str(source), str(event)))
    return found
