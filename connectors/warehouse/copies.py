"""The event ids a sink loaded lately, per partition: later copies of them are dropped.

A copy of an event reaches a destination topic at a new offset when the worker processes
it again after a crash or a rebalance (at least once), or when a client sends it again
after a lost answer (the same `messageId`). Every copy has the event's key, so it lands on
the same partition as the first one; the sink of that partition remembers the last
`copy_window` (source, event id) pairs it took and drops a record whose pair it has seen.
So a plain `SELECT count()` counts each event once in every table, without `FINAL`, for
copies within the window. A partition's window is read from the raw table when the
partition is assigned, so a restarted sink, or the next owner after a rebalance, knows
what was loaded before it.
"""

from __future__ import annotations

from collections.abc import Iterable

from connectors.warehouse.clickhouse import Warehouse

EventKey = tuple[str, str]  # (source_id, event_id)


class RecentIds:
    """At most `size` event keys, the oldest forgotten first; `size` 0 remembers nothing."""

    def __init__(self, size: int, keys: Iterable[EventKey] = ()) -> None:
        self.size = size
        self._keys: dict[EventKey, None] = {}
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: EventKey) -> bool:
        return key in self._keys

    def add(self, key: EventKey) -> None:
        if self.size <= 0 or key in self._keys:
            return
        self._keys[key] = None
        if len(self._keys) > self.size:
            del self._keys[next(iter(self._keys))]


def recent_event_ids(
    warehouse: Warehouse, table: str, topic: str, partition: int, limit: int
) -> list[EventKey]:
    """The keys of the last `limit` rows `topic`/`partition` put in `table`, oldest first."""
    if limit <= 0:
        return []
    rows = warehouse.rows(
        "SELECT source_id, event_id FROM {table:Identifier} "
        "WHERE _topic = {t:String} AND _partition = {p:UInt32} "
        "ORDER BY _offset DESC LIMIT {n:UInt64}",
        {"table": table, "t": topic, "p": partition, "n": limit},
        "reading recent event ids",
    )
    return [(str(s), str(e)) for s, e in reversed(rows)]
