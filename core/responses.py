"""JSON responses and errors: every answer of the HTTP APIs (gateway, lease API) is JSON."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error(status: int, reason: str, **headers: str) -> web.HTTPException:
    """An HTTP error to raise, with `{"error": reason}` as its body."""
    exc = web.HTTPException(
        text=orjson.dumps({"error": reason}).decode(),
        content_type="application/json",
        headers=headers,
    )
    exc.set_status(status)
    return exc
