"""Webhook destinations: POST events to a URL, rate limited, with a circuit breaker.

Responses are classified like the error model says: 2xx delivered; 408, 429, 5xx,
timeouts and connection errors retriable (a Retry-After is honoured); any other 4xx
fatal. A retriable failure is tried again with backoff while the breaker is closed;
after `failures` consecutive failures the breaker opens, delivery pauses for
`cooldown_s`, then one probe decides whether to close it again.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from ops.config import Breaker, WebhookConfig
from schemas.errors import DestinationUnavailable, SluiceError

_ENV = re.compile(r"\$\{([A-Z0-9_]+)\}")


class DeliveryRejected(SluiceError):
    """The destination refused the request for good (a 4xx other than 408/429)."""


def _expand(value: str) -> str:
    return _ENV.sub(lambda m: os.environ.get(m.group(1), ""), value)


def request_headers(cfg: WebhookConfig) -> dict[str, str]:
    """Configured headers, with auth, `${ENV}` references expanded."""
    headers = {"Content-Type": "application/json"} | {k: _expand(v) for k, v in cfg.headers.items()}
    if cfg.auth is not None:
        if cfg.auth.type == "bearer":
            headers["Authorization"] = f"Bearer {_expand(cfg.auth.token)}"
        else:
            creds = aiohttp.BasicAuth(_expand(cfg.auth.username), _expand(cfg.auth.password))
            headers["Authorization"] = creds.encode()
    return headers


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def payload(event: dict[str, Any]) -> dict[str, Any]:
    """The event as Segment/RudderStack-shaped JSON (from an envelope decoded with int timestamps)."""
    body: dict[str, Any] = {
        "messageId": event["event_id"],
        "type": event["type"],
        "userId": event["user_id"],
        "anonymousId": event["anonymous_id"],
        "timestamp": _iso(event["timestamp"]),
        "receivedAt": _iso(event["received_at"]),
        "sentAt": _iso(event["sent_at"]),
        "originalTimestamp": _iso(event["original_timestamp"]),
        "context": orjson.loads(event["context"]),
        "sourceId": event["source_id"],
    }
    if event["type"] == "track":
        body["event"] = event["event"]
    elif event["type"] in ("page", "screen"):
        body["name"] = event["event"]
    if event["type"] in ("identify", "group"):
        body["traits"] = orjson.loads(event["traits"])
    else:
        body["properties"] = orjson.loads(event["properties"])
    if event["group_id"]:
        body["groupId"] = event["group_id"]
    if event["previous_id"]:
        body["previousId"] = event["previous_id"]
    return {k: v for k, v in body.items() if v is not None}


@dataclass
class Pacer:
    """Spaces requests `1/rate` seconds apart; `share` scales the rate to this process's part."""

    rate: float
    share: float = 1.0
    _next: float = 0.0

    async def wait(self) -> None:
        """Sleep until the next request may go (each caller takes its own slot)."""
        interval = 1.0 / (self.rate * self.share) if self.share > 0 else 1.0
        now = time.monotonic()
        slot = max(now, self._next)
        # The slot is taken before sleeping, so callers waiting side by side space out.
        self._next = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)


class CircuitBreaker:
    """Counts consecutive failures; open means: do not call, wait for the cooldown."""

    def __init__(self, cfg: Breaker) -> None:
        self.cfg = cfg
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cfg.cooldown_s else "open"

    def until_probe(self) -> float:
        """Seconds until a probe may go (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cfg.cooldown_s - time.monotonic())

    def success(self) -> None:
        """A delivery worked: close."""
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        """A delivery failed: open after enough of them (a failed probe reopens)."""
        self.failures += 1
        if self.failures >= self.cfg.failures:
            self.opened_at = time.monotonic()


class WebhookClient:
    """Sends batches of events to one webhook and classifies the answer."""

    def __init__(self, cfg: WebhookConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.headers = request_headers(cfg)
        self.url = str(cfg.url)

    async def send(self, events: Sequence[dict[str, Any]], attempt: int = 1) -> None:
        """POST the events (one object, or an array when batching); raise by class on failure.

        `X-Sluice-Attempt` tells the receiver which try this is (1 for the first).
        """
        bodies = [payload(e) for e in events]
        data = orjson.dumps(bodies if self.cfg.batch_size > 1 else bodies[0])
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        headers = self.headers | {"X-Sluice-Attempt": str(attempt)}
        try:
            async with self.session.post(
                self.url, data=data, headers=headers, timeout=timeout
            ) as resp:
                status = resp.status
                text = (await resp.text())[:200]
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise DestinationUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise DestinationUnavailable(f"HTTP {status}: {text}", retry_after)
        raise DeliveryRejected(f"HTTP {status}: {text}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
