"""Read-only queries of the warehouse: the engine refuses writes, reads stay inside it.

Three layers, the engine doing the refusing wherever it can:

1. ClickHouse parses the statement (`formatQuery`, the text passed as a bound parameter):
   one statement only, comments gone, and the canonical text is what runs afterwards.
2. Its syntax tree (`EXPLAIN AST` of that text) must be a read statement (SELECT, WITH,
   SHOW, DESCRIBE, EXISTS, EXPLAIN) that names no table function outside a short list of
   generators and no function that reads a file or reaches another server, and has no
   `INTO OUTFILE`. This closes what `readonly` leaves open in the embedded engine
   (clickhouse-local runs `file()`, `python()`, `KILL QUERY` and `INTO OUTFILE` under it).
3. Every query runs with `readonly=1` and the bounds of `query_settings`: the engine refuses
   writes, DDL, `SET`, a `SETTINGS` clause and the table functions that reach files, URLs
   or other servers, and stops a query at its time, result and memory limits.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from connectors.errors import DestinationUnavailable, QueryFailed, QueryRefused, QueryTimeout
from core.settings import WarehouseSettings

# Statement kinds (the root of `EXPLAIN AST`) that only read.
READ_STATEMENTS = frozenset(
    {
        "SelectWithUnionQuery",
        "ShowTables",  # also SHOW DATABASES, SHOW DICTIONARIES, SHOW SETTINGS
        "ShowColumns",
        "ShowFunctions",
        "ShowCreateTableQuery",
        "ShowCreateViewQuery",
        "ShowCreateDatabaseQuery",
        "ShowCreateDictionaryQuery",
        "ExistsTableQuery",
        "ExistsViewQuery",
        "ExistsDatabaseQuery",
        "ExistsDictionaryQuery",
        "DescribeQuery",
        "Explain",
    }
)
# Table functions that generate rows or read tables of the warehouse, nothing else.
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "primes",
        "generateRandom",
        "generateSeries",
        "generate_series",
        "values",
        "null",
        "view",
        "merge",
    }
)
# Ordinary functions that read a file or connect to another server.
DENIED_FUNCTIONS = frozenset({"file", "hascolumnintable", "catboostevaluate"})

_CODE = re.compile(r"Code: (\d+)\.")
_REFUSED_CODES = frozenset({164, 497, 344})  # READONLY, ACCESS_DENIED, SUPPORT_IS_DISABLED
_TIMEOUT_CODES = frozenset({159, 160})  # TIMEOUT_EXCEEDED, TOO_SLOW
_LIMIT_CODES = frozenset({396, 241, 158, 307})  # result rows/bytes, memory, rows, bytes


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a query."""

    columns: list[str]
    rows: list[list[Any]]


def query_settings(settings: WarehouseSettings) -> dict[str, str]:
    """The ClickHouse settings every query runs with; `readonly` last, so the others apply."""
    return {
        "max_execution_time": f"{settings.query_timeout_s:g}",
        "timeout_overflow_mode": "throw",
        "max_result_rows": str(settings.query_max_rows),
        "max_result_bytes": str(settings.query_max_bytes),
        "result_overflow_mode": "throw",
        "max_memory_usage": str(settings.query_max_memory_bytes),
        "readonly": "1",
    }


@dataclass(frozen=True)
class AstNode:
    """One line of `EXPLAIN AST`: its depth, its kind and the rest of the line."""

    depth: int
    kind: str
    detail: str
    parent: int  # index of the parent node, -1 for the root

    @property
    def name(self) -> str:
        """A function's or identifier's name."""
        return self.detail.split(" ", 1)[0] if self.detail else ""


def parse_ast(lines: list[str]) -> list[AstNode]:
    """The nodes of an `EXPLAIN AST` dump (one space of indent per level)."""
    nodes: list[AstNode] = []
    stack: list[int] = []  # index of the last node at each depth
    for line in lines:
        text = line.strip()
        if not text:
            continue
        depth = len(line) - len(line.lstrip(" "))
        kind, _, detail = text.partition(" ")
        del stack[depth:]
        parent = stack[-1] if stack else -1
        nodes.append(AstNode(depth, kind, detail.strip(), parent))
        stack.append(len(nodes) - 1)
    return nodes


def check_ast(nodes: list[AstNode]) -> None:
    """Refuse anything but one read statement over the warehouse's own tables."""
    if not nodes:
        raise QueryRefused("empty statement")
    root = nodes[0]
    if root.kind not in READ_STATEMENTS:
        raise QueryRefused(
            f"only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN run here, not {root.kind}"
        )
    # The statements whose output a query directs: the root and what an EXPLAIN explains.
    statements = {0}
    for i, node in enumerate(nodes):
        parent = nodes[node.parent] if node.parent >= 0 else None
        if parent is not None and parent.kind == "Explain" and node.kind not in _EXPLAIN_ARGS:
            if node.kind not in READ_STATEMENTS:
                raise QueryRefused(f"EXPLAIN of {node.kind} does not run here")
            statements.add(i)
    for node in nodes:
        if node.kind == "Literal" and node.parent in statements:
            raise QueryRefused("INTO OUTFILE does not run here: results come back as JSON")
        if node.kind != "Function":
            continue
        name = node.name
        parent = nodes[node.parent] if node.parent >= 0 else None
        if parent is not None and parent.kind == "TableExpression":
            if name not in ALLOWED_TABLE_FUNCTIONS:
                raise QueryRefused(
                    f"table function {name}() does not run here: queries read the "
                    "warehouse's tables only, never files, URLs or other servers"
                )
        elif name.lower() in DENIED_FUNCTIONS:
            raise QueryRefused(
                f"function {name}() does not run here: it reads outside the warehouse"
            )


_EXPLAIN_ARGS = frozenset({"Set", "Identifier", "Literal"})


def classify(exc: Exception) -> QueryFailed:
    """An engine error as the failure the client sees."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    message = re.sub(r"\s*\(version [^)]*\)", "", message)
    found = _CODE.search(message)
    code = int(found.group(1)) if found else 0
    if code in _TIMEOUT_CODES:
        return QueryTimeout(message, "timeout")
    if code in _LIMIT_CODES:
        return QueryFailed(message, "too_large")
    if code in _REFUSED_CODES:
        return QueryFailed(message, "refused")
    return QueryFailed(message, "invalid")


class ReadOnlyQueries:
    """Queries on a client of their own, one at a time, never under the sink's insert lock.

    Embedded, the client is a second handle on the same engine (chdb allows several in one
    process; inserts on the sink's handle go on while a query runs) and its session carries
    `query_settings` too; on a server, the settings ride on every request.
    """

    def __init__(self, connect: Callable[[], Any], settings: WarehouseSettings) -> None:
        self.settings = settings
        self._connect = connect
        self._client: Any = None
        self._lock = threading.Lock()
        self._settings = query_settings(settings)

    def _run(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        if self._client is None:
            self._client = self._connect()
        try:
            return self._client.query(sql, parameters=parameters, settings=self._settings)
        except (OperationalError, ConnectionError, OSError) as exc:
            raise DestinationUnavailable(f"warehouse query failed: {exc}") from exc
        except ClickHouseError as exc:
            raise classify(exc) from exc

    def canonical(self, sql: str) -> str:
        """The engine's own text of the one statement in `sql` (refused: several, none)."""
        try:
            result = self._run("SELECT formatQuery({q:String})", {"q": sql})
        except QueryFailed as exc:
            message = str(exc)
            if "Multi-statements are not allowed" in message:
                raise QueryRefused("one statement per query") from None
            if exc.reason != "invalid":
                raise
            # Drop the echo of the wrapping call, keep the parser's words and the code name.
            head, _, tail = message.partition(": In scope SELECT formatQuery(")
            code = re.search(r"\(([A-Z_]+)\)$", tail)
            raise QueryFailed(head + (f" ({code.group(1)})" if code else ""), "invalid") from None
        return str(result.result_rows[0][0])

    def check(self, sql: str) -> str:
        """The canonical text of `sql` once its syntax tree passed `check_ast`."""
        statement = self.canonical(sql)
        try:
            tree = self._run(f"EXPLAIN AST {statement}")
        except QueryFailed as exc:
            # A statement that parses alone but not as what EXPLAIN explains (SYSTEM, ...).
            raise QueryRefused(
                f"only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN run here ({exc})"
            ) from None
        check_ast(parse_ast([str(row[0]) for row in tree.result_rows]))
        return statement

    def execute(self, statement: str) -> QueryResult:
        """Run `statement` as it is, read-only and bounded by the engine (no tree check)."""
        result = self._run(statement)
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    def query(self, sql: str) -> QueryResult:
        """Check `sql`, then run its canonical text."""
        with self._lock:
            return self.execute(self.check(sql))

    def close(self) -> None:
        """Close the client, if one was opened."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
