"""The ClickHouse warehouse: connection by DSN, the events table, idempotent inserts, queries.

`chdb://path` runs ClickHouse's engine inside this process (the folder is opened
exclusively, so one process owns it); `http(s)://host:port` talks to a server.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from ops.settings import WarehouseSettings
from schemas.errors import DestinationUnavailable, SluiceError

# Enough recent insert tokens to cover every batch a restarted sink may insert again.
DEDUP_WINDOW = 1000

EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "String"),
    ("source_id", "LowCardinality(String)"),
    ("type", "LowCardinality(String)"),
    ("event", "Nullable(String)"),
    ("user_id", "Nullable(String)"),
    ("anonymous_id", "Nullable(String)"),
    ("timestamp", "DateTime64(3, 'UTC')"),
    ("received_at", "DateTime64(3, 'UTC')"),
    ("sent_at", "Nullable(DateTime64(3, 'UTC'))"),
    ("original_timestamp", "Nullable(DateTime64(3, 'UTC'))"),
    ("properties", "String"),
    ("traits", "String"),
    ("context", "String"),
    ("integrations", "String"),
    ("group_id", "Nullable(String)"),
    ("previous_id", "Nullable(String)"),
    ("_topic", "LowCardinality(String)"),
    ("_partition", "UInt32"),
    ("_offset", "UInt64"),
)
COLUMN_NAMES = tuple(name for name, _ in EVENT_COLUMNS)

_READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QueryRefused(SluiceError):
    """The query endpoint only runs single read-only statements."""


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a query."""

    columns: list[str]
    rows: list[list[Any]]


def events_table_ddl(table: str) -> str:
    """DDL of an events table that deduplicates inserts by token and rows by event id.

    `non_replicated_deduplication_window` turns on insert deduplication on a single node,
    so a batch inserted again with its token leaves one copy; ReplacingMergeTree keyed by
    (source_id, event_id) collapses client retries of one event (read with FINAL).
    """
    if not _IDENT.match(table):
        raise SluiceError(f"invalid table name {table!r}")
    cols = ",\n  ".join(f"`{name}` {ctype}" for name, ctype in EVENT_COLUMNS)
    return (
        f"CREATE TABLE IF NOT EXISTS `{table}` (\n  {cols},\n"
        "  `_loaded_at` DateTime64(3, 'UTC') DEFAULT now64(3)\n)\n"
        "ENGINE = ReplacingMergeTree\n"
        "ORDER BY (source_id, event_id)\n"
        f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"
    )


def table_ddl(
    table: str,
    columns: Sequence[tuple[str, str]],
    order_by: str,
    version: str | None = None,
    replacing: bool = True,
) -> str:
    """DDL of a layout table with insert deduplication on a single node."""
    if not _IDENT.match(table):
        raise SluiceError(f"invalid table name {table!r}")
    cols = ",\n  ".join(f"`{name}` {ctype}" for name, ctype in columns)
    engine = f"ReplacingMergeTree({version or ''})" if replacing else "MergeTree"
    return (
        f"CREATE TABLE IF NOT EXISTS `{table}` (\n  {cols}\n)\nENGINE = {engine}\n"
        f"ORDER BY {order_by}\nSETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"
    )


OFFSETS_TABLE = "_sluice_offsets"
OFFSETS_COLUMNS = (
    ("topic", "String"),
    ("partition", "UInt32"),
    ("first", "UInt64"),
    ("last", "UInt64"),
    ("loaded_at", "DateTime64(3, 'UTC') DEFAULT now64(3)"),
)
DISCARDS_TABLE = "discards"
DISCARDS_COLUMNS = (
    ("table_name", "String"),
    ("column_name", "String"),
    ("column_type", "String"),
    ("value", "String"),
    ("row_id", "String"),
    ("received_at", "DateTime64(3, 'UTC')"),
    ("reason", "String"),
)


class Warehouse:
    """One clickhouse-connect client, shared by the sink and the query endpoint."""

    def __init__(self, settings: WarehouseSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client = _connect(settings)

    @property
    def embedded(self) -> bool:
        """Whether the engine runs in this process (chdb)."""
        return self.settings.dsn.startswith("chdb:")

    def ensure_table(self, table: str) -> None:
        """Create the events table `table` if it does not exist."""
        with self._lock:
            self._client.command(events_table_ddl(table))

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """Run DDL or another statement without a result."""
        try:
            with self._lock:
                self._client.command(sql, parameters=parameters)
        except (OperationalError, ConnectionError, OSError) as exc:
            raise DestinationUnavailable(f"warehouse command failed: {exc}") from exc

    def columns(self, table: str) -> dict[str, str]:
        """Column name -> type of `table` (empty when it does not exist)."""
        with self._lock:
            result = self._client.query(
                "SELECT name, type FROM system.columns "
                "WHERE database = currentDatabase() AND table = {t:String}",
                parameters={"t": table},
            )
        return {str(name): str(ctype) for name, ctype in result.result_rows}

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Add columns (a no-op for those that exist already)."""
        clauses = ", ".join(f"ADD COLUMN IF NOT EXISTS `{n}` {t}" for n, t in columns.items())
        self.command(f"ALTER TABLE `{table}` {clauses}")

    def loaded_ranges(self, topic: str, partition: int) -> list[tuple[int, int]]:
        """Offset ranges of `topic`/`partition` that are in the warehouse already."""
        with self._lock:
            result = self._client.query(
                "SELECT first, last FROM `_sluice_offsets` "
                "WHERE topic = {t:String} AND partition = {p:UInt32} ORDER BY first",
                parameters={"t": topic, "p": partition},
            )
        return [(int(a), int(b)) for a, b in result.result_rows]

    def insert_events(self, table: str, columns: Sequence[list[Any]], token: str) -> None:
        """Insert one batch of the raw events table; the same token twice leaves one copy."""
        self.insert(table, COLUMN_NAMES, columns, token)

    def insert(
        self, table: str, names: Sequence[str], columns: Sequence[list[Any]], token: str
    ) -> None:
        """Insert one column-oriented block; the same token twice leaves one copy."""
        try:
            with self._lock:
                self._client.insert(
                    table,
                    columns,
                    column_names=list(names),
                    column_oriented=True,
                    settings={"insert_deduplication_token": token},
                )
        except (OperationalError, ConnectionError, OSError) as exc:
            raise DestinationUnavailable(f"warehouse insert failed: {exc}") from exc
        except ClickHouseError as exc:
            # Errors that are not about reachability (a missing table, a full disk) also
            # deserve another try rather than a lost batch; the sink backs off.
            raise DestinationUnavailable(f"warehouse refused the insert: {exc}") from exc

    def query(self, sql: str) -> QueryResult:
        """Run one read-only statement (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS)."""
        statement = sql.strip().rstrip(";")
        if not _READ_ONLY.match(statement) or ";" in statement:
            raise QueryRefused("only a single read-only statement (SELECT, SHOW, ...) is allowed")
        with self._lock:
            result = self._client.query(statement)
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    def close(self) -> None:
        """Release the client (and, embedded, the data folder's lock)."""
        with self._lock:
            self._client.close()


def _connect(settings: WarehouseSettings) -> Any:
    dsn = settings.dsn
    if dsn.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=_absolute_chdb(dsn))
    url = urlparse(dsn)
    if url.scheme not in ("http", "https"):
        raise SluiceError(f"warehouse DSN must start with chdb://, http:// or https://: {dsn}")
    password = settings.password.get_secret_value() if settings.password else url.password or ""
    try:
        return clickhouse_connect.get_client(
            host=url.hostname or "127.0.0.1",
            port=url.port or (8443 if url.scheme == "https" else 8123),
            secure=url.scheme == "https",
            username=settings.username or url.username or "default",
            password=password,
            database=settings.database,
        )
    except (OperationalError, OSError) as exc:
        raise DestinationUnavailable(f"cannot reach ClickHouse at {url.hostname}: {exc}") from exc


def _absolute_chdb(dsn: str) -> str:
    """`chdb://relative/path` is resolved against the working directory and created."""

    path = Path(dsn.removeprefix("chdb://"))
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"chdb://{path}"
