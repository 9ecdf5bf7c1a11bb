"""One partition's batch into the warehouse, and the records it refuses found by halving.

A batch's inserts are staged first (layout, type inference and new columns can fail with
nothing written) and run with the raw events table and the offsets last, so a refusal
never leaves the raw table with a half-loaded batch. A batch refused for good is halved,
and each half tried (and halved again), until the single records behind the refusal are
found: those go to the DLQ, every other record loads. Each part's inserts carry the tokens
of its own offset range, so a sink that crashes half way and tries again repeats the same
parts without duplicates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog
from clickhouse_connect.driver.exceptions import ClickHouseError

from connectors.warehouse.buffer import DeadRecord, PartitionBuffer
from connectors.warehouse.clickhouse import (
    OFFSETS_TABLE,
    StagedInsert,
    Warehouse,
    warehouse_error,
)
from connectors.warehouse.loader import Batch, Loader, LoadResult
from connectors.warehouse.metrics import SinkMetrics
from connectors.warehouse.refusals import Refused, refusal
from connectors.warehouse.targets import SinkTarget
from core.ranges import merge_ranges

log = structlog.get_logger("sluice.sink")


class BatchLoading:
    """Loads partition buffers with a `Loader`; `tables` are the raw tables of every target."""

    def __init__(
        self, warehouse: Warehouse, metrics: SinkMetrics, tables: Callable[[], Iterable[str]]
    ) -> None:
        self.warehouse = warehouse
        self.metrics = metrics
        self._tables = tables
        self.loader = Loader(warehouse)
        # After a failed load the loader's picture of the warehouse may be wrong: rebuilt.
        self._stale = False

    def prepare(self, table: str) -> None:
        """Create the raw events table `table` and the bookkeeping tables."""
        self.loader.prepare(table)

    def load(self, target: SinkTarget, buf: PartitionBuffer) -> list[DeadRecord]:
        """Load the batch; the records behind a permanent refusal are found and returned.

        The whole batch is tried first, then halves of it (see the module). Transient
        failures propagate (DestinationUnavailable) to be retried.
        """
        refused: list[DeadRecord] = []
        self._bisect(target, buf, 0, len(buf.events), frozenset(), refused)
        if refused:
            # The batch's whole range counts as loaded: a replay skips it (its refused
            # records are in the DLQ), and the offsets table says so.
            whole = Batch(buf.topic, buf.partition, buf.first, buf.last, [])
            try:
                self._attempt(target, whole)
            except Refused as exc:
                log.warning("batch range not recorded", token=whole.token, error=str(exc))
            log.warning(
                "dead-lettering records the warehouse refused",
                destination=target.destination,
                count=len(refused),
                error=str(refused[0][1]),
            )
        buf.loaded = merge_ranges([*(buf.loaded or []), (buf.first, buf.last)])
        return refused

    def _bisect(
        self,
        target: SinkTarget,
        buf: PartitionBuffer,
        lo: int,
        hi: int,
        written: frozenset[str],
        refused: list[DeadRecord],
    ) -> None:
        events = buf.events[lo:hi]
        if lo == 0 and hi == len(buf.events):
            first, last = buf.first, buf.last
        else:
            first, last = events[0]["_offset"], events[-1]["_offset"]
        try:
            self._attempt(target, Batch(buf.topic, buf.partition, first, last, events), written)
            return
        except Refused as exc:
            failure = exc
        if hi - lo <= 1:
            if hi > lo:
                refused.append((buf.messages[lo], failure.error))
            return
        mid = (lo + hi) // 2
        self._bisect(target, buf, lo, mid, failure.written, refused)
        self._bisect(target, buf, mid, hi, failure.written, refused)

    def _attempt(
        self, target: SinkTarget, batch: Batch, written: frozenset[str] = frozenset()
    ) -> None:
        """Load one (part of a) batch; raises Refused, or DestinationUnavailable to retry.

        The loader's inserts are staged, then run with the raw table and the offsets last,
        skipping tables a larger attempt that contained this one wrote already (`written`):
        those hold this part's rows once. A refusal says which tables it wrote.
        """
        try:
            if self._stale:
                self.loader = Loader(self.warehouse)
                for table in self._tables():
                    self.loader.prepare(table)
                self._stale = False
            with self.warehouse.staging() as staged:
                result = self.loader.load(batch, target.table, target.layout)
        except Exception as exc:
            self._stale = True
            error = refusal(exc)
            if error is None and isinstance(exc, ClickHouseError | OSError):
                raise warehouse_error(exc, "warehouse") from exc
            if error is None:
                raise
            raise Refused(error, written) from exc
        done = set(written)
        for insert in sorted(staged, key=lambda i: _insert_order(i, target.table)):
            if insert.table in written:
                continue
            try:
                self.warehouse.run_insert(insert)
            except Exception as exc:
                self._stale = True
                error = refusal(exc)
                if error is None:
                    raise
                raise Refused(error, frozenset(done)) from exc
            done.add(insert.table)
        self._count(target, result)

    def _count(self, target: SinkTarget, result: LoadResult) -> None:
        self.metrics.new_columns.labels(target.destination).inc(result.new_columns)
        self.metrics.discarded.labels(target.destination).inc(result.discarded)
        overflow = self.metrics.overflow
        overflow.labels(target.destination, "event_tables").inc(result.overflow_tables)
        overflow.labels(target.destination, "columns").inc(result.overflow_columns)


def _insert_order(insert: StagedInsert, raw_table: str) -> tuple[bool, bool]:
    """Layout tables first, then the raw table, then the offsets (a stable sort)."""
    return (insert.table == OFFSETS_TABLE, insert.table == raw_table)
