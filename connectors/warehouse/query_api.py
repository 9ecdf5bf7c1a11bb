"""`POST /query` of the sink process: one read-only statement, authenticated and bounded.

- `Authorization: Bearer <token>` (`query_auth`), else 401.
- `Content-Type: application/json` only, else 415: a browser's cross-site form or
  `text/plain` POST never runs a query (and no CORS header ever invites one).
- One query at a time, on a client of its own (`queries`): a query waits for
  the one before it at most `query_timeout_s` (then 503), and never holds the sink's inserts.
- Refused statements 403, syntax or engine errors 400, a result over the limits 422, a query
  over `query_timeout_s` 504, the warehouse unreachable 503; always `{"error": ...}`.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web

from connectors.errors import DestinationUnavailable, QueryFailed, QueryRefused
from connectors.warehouse.clickhouse import Warehouse
from connectors.warehouse.queries import QueryResult
from connectors.warehouse.query_auth import authorized
from core.settings import WarehouseSettings

_FAILURE_STATUS = {"timeout": 504, "too_large": 422, "refused": 403, "invalid": 400}


def json_default(value: Any) -> Any:
    """orjson's fallback for the values ClickHouse returns."""
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)  # IP addresses and whatever else a column type decodes to


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _failure(exc: QueryRefused | QueryFailed | DestinationUnavailable) -> web.Response:
    if isinstance(exc, QueryRefused):
        return _error(str(exc), 403)
    if isinstance(exc, QueryFailed):
        return _error(str(exc), _FAILURE_STATUS.get(exc.reason, 400))
    return _error(str(exc), 503, {"Retry-After": "5"})


class QueryEndpoint:
    """The handler of `POST /query`; `warehouse` is set once the sink opened it."""

    def __init__(self, settings: WarehouseSettings, token: str) -> None:
        self.settings = settings
        self._token = token
        self.warehouse: Warehouse | None = None
        self._slot = asyncio.Semaphore(1)

    async def handle(self, request: web.Request) -> web.Response:
        """`POST /query {"sql": "..."}`: columns and rows of one read-only statement."""
        sql = await self._statement(request)
        if isinstance(sql, web.Response):
            return sql
        warehouse = self.warehouse
        if warehouse is None:
            return _error("the warehouse is not open yet", 503, {"Retry-After": "1"})
        try:
            async with asyncio.timeout(self.settings.query_timeout_s):
                await self._slot.acquire()
        except TimeoutError:
            return _error("another query is still running; try again", 503, {"Retry-After": "1"})
        try:
            result = await self._run(warehouse, sql)
        except (QueryRefused, QueryFailed, DestinationUnavailable) as exc:
            return _failure(exc)
        return self._answer(result)

    async def _statement(self, request: web.Request) -> str | web.Response:
        """The statement of an authenticated JSON request, or the response refusing it."""
        if not authorized(request.headers.get("Authorization"), self._token):
            return _error(
                "missing or wrong token: send `Authorization: Bearer <token>` "
                "(SLUICE_WAREHOUSE_QUERY_TOKEN, or the sink's token file)",
                401,
                {"WWW-Authenticate": 'Bearer realm="sluice-query"'},
            )
        if request.content_type != "application/json":
            return _error("Content-Type must be application/json", 415)
        try:
            body = orjson.loads(await request.read())
            sql = body["sql"]
            if not isinstance(sql, str):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error('body must be {"sql": "..."}', 400)
        return sql

    def _answer(self, result: QueryResult) -> web.Response:
        payload = orjson.dumps(
            {"columns": result.columns, "rows": result.rows}, default=json_default
        )
        if len(payload) > self.settings.query_max_bytes:
            return _error(
                f"the result is {len(payload)} bytes as JSON, over the limit of "
                f"{self.settings.query_max_bytes} (SLUICE_WAREHOUSE_QUERY_MAX_BYTES)",
                422,
            )
        return web.Response(body=payload, content_type="application/json")

    async def _run(self, warehouse: Warehouse, sql: str) -> QueryResult:
        """Run in a thread (the slot is held); the slot is freed when the thread is done,
        even when the client went away and this coroutine was cancelled."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(None, warehouse.read_only_query, sql)
        except BaseException:
            self._slot.release()
            raise
        future.add_done_callback(lambda _f: self._slot.release())
        return await asyncio.shield(future)
