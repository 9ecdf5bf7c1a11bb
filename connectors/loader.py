"""Loads one batch of events into the warehouse: raw table, layout tables, bookkeeping.

Every insert of a batch carries a token derived from the batch's offset range, so loading
the same batch again (after a crash) changes nothing. New properties become columns;
a value that does not fit its column's type is recorded in `discards`, not lost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from connectors.clickhouse import (
    COLUMN_NAMES,
    DISCARDS_COLUMNS,
    DISCARDS_TABLE,
    OFFSETS_COLUMNS,
    OFFSETS_TABLE,
    Warehouse,
    table_ddl,
)
from connectors.layout import TableRows, infer_type, layout_rows


@dataclass(frozen=True)
class Batch:
    """Decoded events of one partition's offset range."""

    topic: str
    partition: int
    first: int
    last: int
    events: list[dict[str, Any]]

    @property
    def token(self) -> str:
        """The deterministic base of every insert token of this batch."""
        return f"{self.topic}:{self.partition}:{self.first}:{self.last}"


@dataclass
class LoadResult:
    """What a load wrote."""

    rows: int = 0
    tables: int = 0
    new_columns: int = 0
    discarded: int = 0


# Python types that fit a column type as they are; other values are converted or discarded.
_FITS: dict[str, tuple[type, ...]] = {
    "String": (str,),
    "Int64": (int,),
    "Float64": (float,),
    "Bool": (bool,),
}


def _base(ctype: str) -> str:
    return ctype[9:-1] if ctype.startswith("Nullable(") else ctype


def _convert(value: Any, base: str) -> tuple[bool, Any]:
    """(fits, value) for a value whose Python type is not the column's own."""
    if base == "Float64" and type(value) is int:
        return True, float(value)
    if base == "String":
        return True, orjson.dumps(value).decode()
    return False, None


class Loader:
    """Creates tables and columns as needed and inserts batches idempotently."""

    def __init__(self, warehouse: Warehouse, table_prefix: str = "") -> None:
        self.warehouse = warehouse
        self.prefix = table_prefix
        self._columns: dict[str, dict[str, str]] = {}

    def prepare(self, events_table: str) -> None:
        """Create the raw events table and the bookkeeping tables."""
        self.warehouse.ensure_table(events_table)
        self.warehouse.command(
            table_ddl(OFFSETS_TABLE, OFFSETS_COLUMNS, "(topic, partition, first)", replacing=False)
        )
        self.warehouse.command(
            table_ddl(
                self.prefix + DISCARDS_TABLE,
                DISCARDS_COLUMNS,
                "(table_name, column_name, received_at)",
                replacing=False,
            )
        )

    def load(self, batch: Batch, events_table: str, layout: bool) -> LoadResult:
        """Insert the batch into every table it touches, then record its offset range."""
        result = LoadResult()
        if batch.events:
            columns = [[e[name] for e in batch.events] for name in COLUMN_NAMES]
            self.warehouse.insert_events(events_table, columns, f"{batch.token}:{events_table}")
            result.rows += len(batch.events)
            result.tables += 1
        if layout and batch.events:
            discards: list[list[Any]] = []
            for table, rows in sorted(layout_rows(batch.events).items()):
                name = self.prefix + table
                names, cols, added = self._columns_for(name, rows, discards)
                self.warehouse.insert(name, names, cols, f"{batch.token}:{name}")
                result.rows += len(rows.rows)
                result.tables += 1
                result.new_columns += added
            if discards:
                table = self.prefix + DISCARDS_TABLE
                cols = [list(c) for c in zip(*discards, strict=True)]
                names = [n for n, _ in DISCARDS_COLUMNS]
                self.warehouse.insert(table, names, cols, f"{batch.token}:{table}")
                result.discarded = len(discards)
        self.warehouse.insert(
            OFFSETS_TABLE,
            ["topic", "partition", "first", "last"],
            [[batch.topic], [batch.partition], [batch.first], [batch.last]],
            f"{batch.token}:offsets",
        )
        return result

    def _known(self, table: str, rows: TableRows) -> dict[str, str]:
        known = self._columns.get(table)
        if known is None:
            self.warehouse.command(table_ddl(table, rows.fixed, rows.order_by, rows.version))
            known = self._columns[table] = self.warehouse.columns(table)
        return known

    def _columns_for(
        self, table: str, rows: TableRows, discards: list[list[Any]]
    ) -> tuple[list[str], list[list[Any]], int]:
        known = self._known(table, rows)
        seen: dict[str, Counter[str]] = {}
        for row in rows.rows:
            for name, value in row.items():
                if name not in known and value is not None:
                    seen.setdefault(name, Counter())[infer_type(value)] += 1
        new: dict[str, str] = {}
        for name, kinds in seen.items():
            if set(kinds) == {"Int64", "Float64"}:
                new[name] = "Nullable(Float64)"
            else:
                new[name] = f"Nullable({kinds.most_common(1)[0][0]})"
        if new:
            self.warehouse.add_columns(table, new)
            # Another sink may have added one of them first, with its own type: read back.
            known = self._columns[table] = self.warehouse.columns(table)
        present: set[str] = set().union(*rows.rows)
        present.update(name for name, _ in rows.fixed)
        names = [n for n in known if n in present]
        columns: list[list[Any]] = []
        now = datetime.now(UTC)
        for name in names:
            ctype = known[name]
            fits = _FITS.get(_base(ctype))
            values = [row.get(name) for row in rows.rows]
            if fits is None:
                columns.append(values)  # fixed columns: the envelope's own types
                continue
            for i, value in enumerate(values):
                if value is None or type(value) in fits:
                    continue
                ok, converted = _convert(value, _base(ctype))
                if not ok:
                    row = rows.rows[i]
                    discards.append(
                        [
                            table,
                            name,
                            ctype,
                            orjson.dumps(value).decode(),
                            str(row.get("id", "")),
                            row.get("received_at", now),
                            f"a {infer_type(value)} does not fit {ctype}",
                        ]
                    )
                values[i] = converted
            columns.append(values)
        return names, columns, len(new)
