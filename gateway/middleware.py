"""The gateway's middleware: requests counted by route and status, every error a JSON body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway.app_keys import METRICS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests by route and status, and turns every error into a JSON body."""
    metrics = request.app[METRICS]
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "-"
    )
    metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if exc.content_type != "application/json":
            reason = exc.reason if exc.status >= 400 else ""
            if status == 413:
                reason = "request body too large"
            if reason:
                exc.text = orjson.dumps({"error": reason}).decode()
                exc.content_type = "application/json"
        raise
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(route, str(status)).inc()
