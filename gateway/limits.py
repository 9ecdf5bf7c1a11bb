"""Request limits: per-source token buckets and a bound on JSON nesting."""

from __future__ import annotations

import math
import time
from typing import Any

from core.config import RateLimit


class TokenBucket:
    """Tokens refill at `rate` a second up to `capacity`; a request takes one per event."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, limit: RateLimit) -> None:
        self.rate = limit.events_per_s
        self.capacity = limit.capacity
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self, count: int) -> float:
        """Take `count` tokens; 0 when granted, else the seconds until they would be there."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if count <= self.tokens:
            self.tokens -= count
            return 0.0
        if count > self.capacity:
            # Never grantable at once: tell the client to come back with smaller requests.
            return math.inf
        return (count - self.tokens) / self.rate


def too_deep(value: Any, limit: int) -> bool:
    """Whether containers in `value` nest deeper than `limit` levels."""
    return not _within(value, limit)


def _within(node: Any, remaining: int) -> bool:
    if remaining <= 0:
        return False
    kind = type(node)
    if kind is dict:
        children = node.values()
    elif kind is list:
        children = node
    else:
        return True
    for child in children:
        t = type(child)
        if (t is dict or t is list) and not _within(child, remaining - 1):
            return False
    return True
