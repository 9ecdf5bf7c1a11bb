"""Loads one batch of events into the warehouse: raw table, layout tables, bookkeeping.

Every insert of a batch carries a token derived from the batch's offset range, so loading
the same batch again (after a crash) changes nothing. New properties become columns;
a value that does not fit its column's type is recorded in `discards`, not lost.

Two limits keep a hostile or careless source from exploding the warehouse: a source
writes into at most `max_event_tables` distinct track-event tables (the tables it has
are kept in `_sluice_event_tables`), and a table gets at most `max_columns` columns.
Past them an event still lands in the raw table and `tracks`; what did not fit (the
event table's row, the property's value) is recorded in `discards` with the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from connectors.warehouse.clickhouse import (
    COLUMN_NAMES,
    DISCARDS_COLUMNS,
    DISCARDS_TABLE,
    OFFSETS_COLUMNS,
    OFFSETS_TABLE,
    Warehouse,
    table_ddl,
)
from connectors.warehouse.layout import TableRows, infer_type, layout_rows

EVENT_TABLES = "_sluice_event_tables"
EVENT_TABLES_COLUMNS = (
    ("source_id", "String"),
    ("table_name", "String"),
    ("added_at", "DateTime64(3, 'UTC') DEFAULT now64(3)"),
)


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
    # Values that did not fit their column's type, or met another key's column.
    discarded: int = 0
    # Track events kept out of their event table: their source has `max_event_tables`.
    overflow_tables: int = 0
    # Property values kept out of a table that has `max_columns` columns.
    overflow_columns: int = 0


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

    def __init__(
        self,
        warehouse: Warehouse,
        table_prefix: str = "",
        max_event_tables: int | None = None,
        max_columns: int | None = None,
    ) -> None:
        self.warehouse = warehouse
        self.prefix = table_prefix
        settings = warehouse.settings
        self.max_event_tables = (
            settings.max_event_tables if max_event_tables is None else max_event_tables
        )
        self.max_columns = settings.max_columns if max_columns is None else max_columns
        self._columns: dict[str, dict[str, str]] = {}
        # Raw tables (without the prefix) that no event table may be.
        self._raw: set[str] = set()
        # Source id -> the event tables it writes into (read from the warehouse once).
        self._event_tables: dict[str, set[str]] = {}

    def prepare(self, events_table: str) -> None:
        """Create the raw events table and the bookkeeping tables."""
        self.warehouse.ensure_table(events_table)
        if events_table.startswith(self.prefix):
            self._raw.add(events_table.removeprefix(self.prefix))
        self.warehouse.command(
            table_ddl(
                self.prefix + EVENT_TABLES,
                EVENT_TABLES_COLUMNS,
                "(source_id, table_name)",
                replacing=False,
            )
        )
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
            tables = layout_rows(batch.events, frozenset(self._raw))
            self._limit_event_tables(tables, batch.token, discards, result)
            for table, rows in sorted(tables.items()):
                name = self.prefix + table
                for column, value, row_id, received_at, reason in rows.lost:
                    discards.append(
                        [name, column, "", _text(value), str(row_id), received_at, reason]
                    )
                    result.discarded += 1
                names, cols, added = self._columns_for(name, rows, discards, result)
                self.warehouse.insert(name, names, cols, f"{batch.token}:{name}")
                result.rows += len(rows.rows)
                result.tables += 1
                result.new_columns += added
            if discards:
                table = self.prefix + DISCARDS_TABLE
                cols = [list(c) for c in zip(*discards, strict=True)]
                names = [n for n, _ in DISCARDS_COLUMNS]
                self.warehouse.insert(table, names, cols, f"{batch.token}:{table}")
        self.warehouse.insert(
            OFFSETS_TABLE,
            ["topic", "partition", "first", "last"],
            [[batch.topic], [batch.partition], [batch.first], [batch.last]],
            f"{batch.token}:offsets",
        )
        return result

    def _tables_of(self, source: str) -> set[str]:
        tables = self._event_tables.get(source)
        if tables is None:
            # A string literal with its quote and escape characters escaped.
            quoted = source.replace("\\", "\\\\").replace("'", "\\'")
            found = self.warehouse.query(
                f"SELECT DISTINCT table_name FROM `{self.prefix}{EVENT_TABLES}` "  # noqa: S608
                f"WHERE source_id = '{quoted}'"
            )
            tables = self._event_tables[source] = {str(r[0]) for r in found.rows}
        return tables

    def _limit_event_tables(
        self,
        tables: dict[str, TableRows],
        token: str,
        discards: list[list[Any]],
        result: LoadResult,
    ) -> None:
        """Keep each source within `max_event_tables`; the rest to `discards`.

        Decided in the batch's order from the tables recorded before it, so loading the
        same batch again decides the same; the tables a batch adds are recorded (with the
        batch's token) before any of its rows are inserted.
        """
        added: dict[str, list[str]] = {}
        for table, rows in list(tables.items()):
            if not rows.event:
                continue
            kept: list[dict[str, Any]] = []
            for row in rows.rows:
                source = str(row["source_id"])
                have = self._tables_of(source)
                new = added.setdefault(source, [])
                if table in have or table in new:
                    kept.append(row)
                elif len(have) + len(new) < self.max_event_tables:
                    new.append(table)
                    kept.append(row)
                else:
                    result.overflow_tables += 1
                    discards.append(
                        [
                            self.prefix + table,
                            "",
                            "",
                            _text(row.get("event_text")),
                            str(row["id"]),
                            row["received_at"],
                            f"source {source!r} has {self.max_event_tables} event tables "
                            "(SLUICE_WAREHOUSE_MAX_EVENT_TABLES); the event is in the raw "
                            "table and tracks only",
                        ]
                    )
            if not kept:
                del tables[table]
            elif len(kept) < len(rows.rows):
                ids = {row["id"] for row in kept}
                rows.rows = kept
                rows.lost = [lost for lost in rows.lost if lost[2] in ids]
        pairs = [(source, table) for source, names in added.items() for table in names]
        if pairs:
            name = self.prefix + EVENT_TABLES
            self.warehouse.insert(
                name,
                ["source_id", "table_name"],
                [[s for s, _ in pairs], [t for _, t in pairs]],
                f"{token}:{name}",
            )
            for source, table in pairs:
                self._event_tables[source].add(table)

    def _known(self, table: str, rows: TableRows) -> dict[str, str]:
        known = self._columns.get(table)
        if known is None:
            self.warehouse.command(table_ddl(table, rows.fixed, rows.order_by, rows.version))
            known = self._columns[table] = self.warehouse.columns(table)
        return known

    def _columns_for(
        self, table: str, rows: TableRows, discards: list[list[Any]], result: LoadResult
    ) -> tuple[list[str], list[list[Any]], int]:
        known = self._known(table, rows)
        seen: dict[str, Counter[str]] = {}
        for row in rows.rows:
            for name, value in row.items():
                if name not in known and value is not None:
                    seen.setdefault(name, Counter())[infer_type(value)] += 1
        new: dict[str, str] = {}
        room = self.max_columns - len(known)
        over: set[str] = set()
        for name, kinds in seen.items():
            if len(new) >= room:
                over.add(name)
            elif set(kinds) == {"Int64", "Float64"}:
                new[name] = "Nullable(Float64)"
            else:
                new[name] = f"Nullable({kinds.most_common(1)[0][0]})"
        now = datetime.now(UTC)
        if over:
            # First seen, first in: the batch decides the same when it is loaded again.
            reason = f"table {table} has {self.max_columns} columns (SLUICE_WAREHOUSE_MAX_COLUMNS)"
            for row in rows.rows:
                for name, value in row.items():
                    if name not in over or value is None:
                        continue
                    discards.append(
                        [
                            table,
                            name,
                            "",
                            _text(value),
                            str(row.get("id", "")),
                            row.get("received_at", now),
                            reason,
                        ]
                    )
                    result.overflow_columns += 1
        if new:
            self.warehouse.add_columns(table, new)
            # Another sink may have added one of them first, with its own type: read back.
            known = self._columns[table] = self.warehouse.columns(table)
        present: set[str] = set().union(*rows.rows)
        present.update(name for name, _ in rows.fixed)
        names = [n for n in known if n in present]
        columns: list[list[Any]] = []
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
                    result.discarded += 1
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


def _text(value: Any) -> str:
    """A value as `discards` keeps it: JSON text."""
    return orjson.dumps(value).decode()
