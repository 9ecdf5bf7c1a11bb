"""Read-only warehouse queries for the tools (`sluice sql`, the demo).

With the embedded warehouse (a `chdb:` DSN) the sink process owns the data, so the query
goes to its query endpoint over HTTP; with a ClickHouse server it goes there directly.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.errors import SluiceError
from core.settings import WarehouseSettings


def query_warehouse(sql: str, settings: WarehouseSettings) -> tuple[list[str], list[list[Any]]]:
    """Run a read-only query: through the sink process in embedded mode, directly otherwise."""
    if not settings.dsn.startswith("chdb:"):
        from connectors.warehouse.clickhouse import Warehouse  # noqa: PLC0415

        warehouse = Warehouse(settings)
        try:
            result = warehouse.read_only_query(sql)
        finally:
            warehouse.close()
        return result.columns, result.rows
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from connectors.warehouse.query_auth import configured_token  # noqa: PLC0415

    url = f"http://{settings.query_host}:{settings.query_port}/query"
    token = configured_token(settings)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=orjson.dumps({"sql": sql}), headers=headers)
    try:
        # The sink stops a query at query_timeout_s; the answer may take a little longer.
        with urllib.request.urlopen(req, timeout=settings.query_timeout_s + 30) as resp:  # noqa: S310
            body = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        message = _error_of(exc)
        if exc.code == 401:
            message += (
                f"; set SLUICE_WAREHOUSE_QUERY_TOKEN to the sink's token, or run where the "
                f"sink wrote {settings.query_token_file}"
            )
        raise SluiceError(message) from None
    except OSError as exc:
        raise SluiceError(
            f"no sink answers at {url} ({exc}); the sink process owns the embedded warehouse: "
            "start it with `sluice sink` or `make demo`"
        ) from None
    return body["columns"], body["rows"]


def _error_of(exc: Any) -> str:
    """The `error` of a JSON error answer, or the HTTP status line."""
    try:
        return str(orjson.loads(exc.read())["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError, OSError):
        return str(exc)
