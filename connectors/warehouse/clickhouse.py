"""The ClickHouse warehouse: connection by DSN, the events table, idempotent inserts, queries.

`chdb://path` runs ClickHouse's engine inside this process (the folder is opened
exclusively, so one process owns it); `http(s)://host:port` talks to a server.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import (
    ClickHouseError,
    DataError,
    OperationalError,
    ProgrammingError,
)

from connectors.errors import DestinationUnavailable, WarehouseRefused
from connectors.warehouse.queries import QueryResult, ReadOnlyQueries, query_settings
from core.errors import SluiceError
from core.settings import WarehouseSettings

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

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ClickHouse error codes that say the server, not the write, is the problem right now:
# timeouts, overload, memory, parts, disk, network, replication, access and missing tables
# (an operator fixes these; the same write then succeeds). Every other code refuses the
# write for good. Names as in ClickHouse's src/Common/ErrorCodes.cpp.
TRANSIENT_CODES: frozenset[int] = frozenset(
    {
        23,  # CANNOT_READ_FROM_ISTREAM
        24,  # CANNOT_WRITE_TO_OSTREAM
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        60,  # UNKNOWN_TABLE (dropped under the sink: it is created again)
        74,  # CANNOT_READ_FROM_FILE_DESCRIPTOR
        75,  # CANNOT_WRITE_TO_FILE_DESCRIPTOR
        81,  # UNKNOWN_DATABASE
        159,  # TIMEOUT_EXCEEDED
        160,  # TOO_SLOW
        164,  # READONLY
        173,  # CANNOT_ALLOCATE_MEMORY
        192,  # UNKNOWN_USER
        193,  # WRONG_PASSWORD
        201,  # QUOTA_EXCEEDED
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        225,  # NO_ZOOKEEPER
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS
        279,  # ALL_CONNECTION_TRIES_FAILED
        285,  # TOO_FEW_LIVE_REPLICAS
        319,  # UNKNOWN_STATUS_OF_INSERT
        373,  # SESSION_IS_LOCKED
        394,  # QUERY_WAS_CANCELLED
        425,  # SYSTEM_ERROR
        439,  # CANNOT_SCHEDULE_TASK
        497,  # ACCESS_DENIED
        516,  # AUTHENTICATION_FAILED
        999,  # KEEPER_EXCEPTION
        1000,  # POCO_EXCEPTION
    }
)


def warehouse_error(exc: BaseException, what: str) -> SluiceError:
    """A client error as DestinationUnavailable (transient: retry) or WarehouseRefused (never).

    clickhouse-connect puts the server's code on `Error.code` (from the HTTP exception
    header, or parsed from the embedded engine's `Code: N.` message). Without a code: a
    transport failure (OperationalError: refused, reset, timed out, HTTP 429/503/504) is
    transient; a value the client could not encode for its column (DataError, ValueError,
    OverflowError, TypeError) is refused for good.
    """
    if isinstance(exc, SluiceError):
        return exc
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        found = _ERROR_CODE.search(str(exc))
        code = int(found.group(1)) if found else None
    if isinstance(exc, OSError):  # refused, reset, timed out
        transient = True
    elif code is not None:
        transient = code in TRANSIENT_CODES
    elif isinstance(exc, OperationalError):
        transient = True
    else:
        # A value the client could not encode is refused for good; a server error
        # without a code (an HTTP 502 from a proxy in front of it, say) is not.
        transient = not isinstance(
            exc, DataError | ProgrammingError | ValueError | TypeError | ArithmeticError
        )
    if transient:
        return DestinationUnavailable(f"{what} failed: {exc}")
    return WarehouseRefused(f"{what} refused: {type(exc).__name__}: {exc}", code)


_ERROR_CODE = re.compile(r"\bCode:\s*(\d+)")
_CLIENT_ERRORS = (ClickHouseError, OSError, ValueError, TypeError, ArithmeticError)


@dataclass(frozen=True)
class StagedInsert:
    """An insert collected by `Warehouse.staging()`, run later by `run_insert`."""

    table: str
    names: tuple[str, ...]
    columns: Sequence[list[Any]]
    token: str


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
    """The sink's clickhouse-connect client, and read-only queries on a client of their own."""

    def __init__(self, settings: WarehouseSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client = _connect(settings)
        # Queries never take `_lock`: a long one cannot hold up an insert.
        self._queries = ReadOnlyQueries(lambda: _connect(settings, for_queries=True), settings)
        # Set by `staging()`: inserts are collected here instead of run (sink thread only).
        self._staged: list[StagedInsert] | None = None

    @property
    def embedded(self) -> bool:
        """Whether the engine runs in this process (chdb)."""
        return self.settings.dsn.startswith("chdb:")

    def ensure_table(self, table: str) -> None:
        """Create the events table `table` if it does not exist."""
        self.command(events_table_ddl(table))

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """Run DDL or another statement without a result.

        Raises DestinationUnavailable when the warehouse cannot take it now and
        WarehouseRefused when it never will (an ALTER over the query size limit, say).
        """
        try:
            with self._lock:
                self._client.command(sql, parameters=parameters)
        except _CLIENT_ERRORS as exc:
            raise warehouse_error(exc, "warehouse command") from exc

    def columns(self, table: str) -> dict[str, str]:
        """Column name -> type of `table` (empty when it does not exist)."""
        try:
            with self._lock:
                result = self._client.query(
                    "SELECT name, type FROM system.columns "
                    "WHERE database = currentDatabase() AND table = {t:String}",
                    parameters={"t": table},
                )
        except _CLIENT_ERRORS as exc:
            raise warehouse_error(exc, "reading the columns of a table") from exc
        return {str(name): str(ctype) for name, ctype in result.result_rows}

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Add columns (a no-op for those that exist already)."""
        clauses = ", ".join(f"ADD COLUMN IF NOT EXISTS `{n}` {t}" for n, t in columns.items())
        self.command(f"ALTER TABLE `{table}` {clauses}")

    def loaded_ranges(self, topic: str, partition: int) -> list[tuple[int, int]]:
        """Offset ranges of `topic`/`partition` that are in the warehouse already."""
        rows = self.rows(
            "SELECT first, last FROM `_sluice_offsets` "
            "WHERE topic = {t:String} AND partition = {p:UInt32} ORDER BY first",
            {"t": topic, "p": partition},
            "reading loaded offsets",
        )
        return [(int(a), int(b)) for a, b in rows]

    def rows(self, sql: str, parameters: dict[str, Any], what: str) -> list[Sequence[Any]]:
        """The rows of one of the sink's own parameterised reads (failures named `what`)."""
        try:
            with self._lock:
                return list(self._client.query(sql, parameters=parameters).result_rows)
        except _CLIENT_ERRORS as exc:
            raise warehouse_error(exc, what) from exc

    def insert_events(self, table: str, columns: Sequence[list[Any]], token: str) -> None:
        """Insert one batch of the raw events table; the same token twice leaves one copy."""
        self.insert(table, COLUMN_NAMES, columns, token)

    def insert(
        self, table: str, names: Sequence[str], columns: Sequence[list[Any]], token: str
    ) -> None:
        """Insert one column-oriented block; the same token twice leaves one copy.

        Inside `staging()` the insert is only collected. Raises DestinationUnavailable
        for a transient failure (retry the same block with the same token) and
        WarehouseRefused for a block that will never go in (`warehouse_error`).
        """
        if self._staged is not None:
            self._staged.append(StagedInsert(table, tuple(names), columns, token))
            return
        self.run_insert(StagedInsert(table, tuple(names), columns, token))

    @contextlib.contextmanager
    def staging(self) -> Iterator[list[StagedInsert]]:
        """Collect the inserts made inside the block instead of running them.

        DDL still runs at once. A loader's work that can fail before anything is written
        (layout, type inference, new columns) then fails with nothing written, and the
        caller runs the collected inserts in the order it chooses (`run_insert`).
        """
        staged: list[StagedInsert] = []
        self._staged = staged
        try:
            yield staged
        finally:
            self._staged = None

    def run_insert(self, insert: StagedInsert) -> None:
        """Run one insert (see `insert`)."""
        try:
            with self._lock:
                self._client.insert(
                    insert.table,
                    insert.columns,
                    column_names=list(insert.names),
                    column_oriented=True,
                    settings={"insert_deduplication_token": insert.token},
                )
        except _CLIENT_ERRORS as exc:
            raise warehouse_error(exc, f"warehouse insert into {insert.table}") from exc

    def query(self, sql: str) -> QueryResult:
        """The sink's own reads (its bookkeeping; SQL it wrote itself) on its client.

        Never a statement from outside: those go through `read_only_query`.
        """
        with self._lock:
            result = self._client.query(sql)
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    def read_only_query(self, sql: str) -> QueryResult:
        """Run one statement from a user (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS).

        Checked and bounded as `queries` says, on a client of its own that never
        takes the sink's lock; raises QueryRefused, QueryFailed (QueryTimeout), or
        DestinationUnavailable when the server cannot be reached.
        """
        return self._queries.query(sql)

    @property
    def queries(self) -> ReadOnlyQueries:
        """The read-only query client."""
        return self._queries

    def close(self) -> None:
        """Release the clients (and, embedded, the data folder's lock)."""
        self._queries.close()
        with self._lock:
            self._client.close()


def _connect(settings: WarehouseSettings, for_queries: bool = False) -> Any:
    """A client for the sink, or (`for_queries`) one whose queries are read-only and bounded.

    Embedded, the query client's session carries `query_settings` (and so does each of its
    queries); on a server each query sends them, as the user `query_username` if set.
    """
    dsn = settings.dsn
    if dsn.startswith("chdb://"):
        if for_queries:
            return clickhouse_connect.get_client(
                dsn=_absolute_chdb(dsn), settings=query_settings(settings)
            )
        return clickhouse_connect.get_client(dsn=_absolute_chdb(dsn))
    url = urlparse(dsn)
    if url.scheme not in ("http", "https"):
        raise SluiceError(f"warehouse DSN must start with chdb://, http:// or https://: {dsn}")
    username = settings.username or url.username or "default"
    password = settings.password.get_secret_value() if settings.password else url.password or ""
    extra: dict[str, Any] = {}
    if for_queries:
        if settings.query_username:
            username = settings.query_username
            secret = settings.query_password
            password = secret.get_secret_value() if secret else ""
        # The socket waits a little longer than the server lets a query run.
        extra["send_receive_timeout"] = settings.query_timeout_s + 10
    try:
        return clickhouse_connect.get_client(
            host=url.hostname or "127.0.0.1",
            port=url.port or (8443 if url.scheme == "https" else 8123),
            secure=url.scheme == "https",
            username=username,
            password=password,
            database=settings.database,
            **extra,
        )
    except (OperationalError, OSError) as exc:
        raise DestinationUnavailable(f"cannot reach ClickHouse at {url.hostname}: {exc}") from exc


def _absolute_chdb(dsn: str) -> str:
    """`chdb://relative/path` is resolved against the working directory and created."""

    path = Path(dsn.removeprefix("chdb://"))
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"chdb://{path}"
