"""When a webhook request may go, and what its answer says: circuit breaker and pacer.

A retriable failure (`DestinationUnavailable`) counts against the destination's breaker:
after `breaker.failures` consecutive ones it opens, and no request goes for
`breaker.cooldown_s`; then it is half-open and one probe at a time decides whether it
closes again. An answer that refuses the events (`DeliveryRejected`) says the
destination is up, so it closes the breaker. The pacer spaces requests to the
destination's `rate_limit`, scaled to this process's share of its partitions.
`Sender` puts a request through both and classifies its outcome for the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from connectors.delivery.metrics import BREAKER_STATES, DeliveryMetrics
from connectors.errors import DeliveryRejected, DestinationUnavailable
from connectors.webhook import WebhookClient
from core.config import Breaker, WebhookConfig
from core.errors import SchemaError


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


class Sender:
    """Sends requests to one destination when its breaker and its pacer let them go."""

    def __init__(
        self,
        destination: str,
        cfg: WebhookConfig,
        metrics: DeliveryMetrics,
        stopping: asyncio.Event,
    ) -> None:
        """`stopping` cuts short a wait for the breaker's cooldown."""
        self.destination = destination
        self.metrics = metrics
        self.breaker = CircuitBreaker(cfg.breaker)
        self.pacer = Pacer(cfg.rate_limit.requests_per_s) if cfg.rate_limit else None
        self.client: WebhookClient | None = None  # set once the HTTP session is open
        self._stopping = stopping
        self._probe = asyncio.Lock()

    async def attempt(self, events: list[dict[str, Any]], attempt: int = 1) -> BaseException | None:
        """One request: None when delivered, else the (classified) error."""
        assert self.client is not None
        probing = await self._closed_breaker()
        if self.pacer is not None:
            await self.pacer.wait()
        try:
            await self.client.send(events, attempt)
        except (SchemaError, ValueError, KeyError, TypeError) as exc:
            # The event cannot be made into a request (junk in its JSON fields): it would
            # fail the same way every time, so it is treated as refused.
            self.metrics.requests.labels(self.destination, "unsendable").inc()
            return DeliveryRejected(f"cannot send the event: {type(exc).__name__}: {exc}")
        except DestinationUnavailable as exc:
            self.breaker.failure()
            self.metrics.requests.labels(self.destination, "retriable").inc()
            self.metrics.breaker.labels(self.destination).set(BREAKER_STATES[self.breaker.state])
            return exc
        except DeliveryRejected as exc:
            self.breaker.success()  # the destination answered: it is up
            self.metrics.requests.labels(self.destination, "fatal").inc()
            return exc
        finally:
            if probing:
                self._probe.release()
        self.breaker.success()
        self.metrics.breaker.labels(self.destination).set(BREAKER_STATES["closed"])
        self.metrics.requests.labels(self.destination, "delivered").inc()
        self.metrics.events.labels(self.destination, "delivered").inc(len(events))
        return None

    async def _closed_breaker(self) -> bool:
        """Wait while the breaker is open; half-open, one probe goes at a time (True: this one)."""
        while True:
            if wait := self.breaker.until_probe():
                self.metrics.breaker.labels(self.destination).set(BREAKER_STATES["open"])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
                continue
            if self.breaker.state == "closed":
                return False
            await self._probe.acquire()
            if self.breaker.state == "half-open":
                return True  # the caller releases the lock when its request is answered
            self._probe.release()
