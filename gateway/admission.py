"""Admission of a request: the source its write key names, and the source's rate limit."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from core.config import Source
from gateway.app_keys import METRICS, SOURCES
from gateway.auth import basic_username
from gateway.responses import error


def body_key(body: Any) -> str | None:
    """The `writeKey` of a parsed body, if it has one."""
    key = body.get("writeKey") if isinstance(body, dict) else None
    return key if isinstance(key, str) else None


def _unauthorized() -> web.HTTPException:
    return error(
        401, "unknown or missing write key", **{"WWW-Authenticate": 'Basic realm="sluice"'}
    )


def key_source(request: web.Request) -> Source | None:
    """The source of the key in the request's header or URL, checked before the body is read.

    A key there decides: an unknown one gets 401 without a byte of the body read or
    parsed. None when neither carries a key (then the body's `writeKey` decides).
    """
    sources = request.app[SOURCES]
    header = request.headers.get("Authorization")
    if header:
        source = sources.source_for_header(header)
        if source is not None:
            return source
        if basic_username(header) is not None:
            raise _unauthorized()
    # Webhook senders often cannot set headers: `?writeKey=` as RudderStack allows.
    key = request.query.get("writeKey")
    if key is None:
        return None
    source = sources.source_for(key)
    if source is None:
        raise _unauthorized()
    return source


def authenticate(request: web.Request, source: Source | None, body_key: str | None) -> Source:
    """`source` (from the header or URL) or else the source of the body's `writeKey`."""
    if source is not None:
        return source
    found = request.app[SOURCES].source_for(body_key)
    if found is None:
        raise _unauthorized()
    return found


def rate_limit(request: web.Request, source: Source, count: int) -> None:
    """Take `count` events from the source's token bucket; 429 when they are not there."""
    bucket = request.app[SOURCES].bucket(source.id)
    if bucket is None:
        return
    wait = bucket.take(count)
    if wait == 0:
        return
    request.app[METRICS].events.labels(source.id, "rate_limited").inc(count)
    if wait == float("inf"):
        reason = f"{count} events exceed the source's burst of {bucket.capacity:.0f}; send fewer per request"
        raise error(429, reason, **{"Retry-After": "1"})
    raise error(
        429, "rate limit exceeded for this source", **{"Retry-After": str(max(1, math.ceil(wait)))}
    )
