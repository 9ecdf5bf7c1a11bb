"""A queue's limits for the whole consumer group: the rate limit and the concurrency cap.

They hold across every worker process without a coordinator of their own: each process
takes the share of the partitions it owns. A queue's priority topics have the same
partitions, and the group's range assignment gives partition n of every one of them to
the same process, so the processes own disjoint sets of partition numbers that together
are all of them. With P partitions:

- **rate:** a process owning k of them gets a token bucket of `jobs_per_s * k / P` per
  second holding up to `max(1, burst * k / P)` tokens; the buckets together admit at most
  `jobs_per_s` per second plus `burst` (plus one per process, the least a bucket holds).
- **concurrency:** slot i of `max_concurrency` belongs to partition number `i mod P`; a
  process may run as many attempts at once as it owns slots, so the slots of all the
  processes are `max_concurrency` exactly (a process with none waits for the next
  rebalance; run no more processes than the cap). During a rebalance a process
  starts nothing and waits for its running attempts before it gives its partitions up,
  so the cap also holds while partitions move.

Jobs are spread over the partitions by their key (the job id, or the ordering key), so at
load every process has work for its share; a partition without jobs leaves its share
unused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core.config import Queue


class Limits:
    """This process's share of a queue's limits, from the partition numbers it owns."""

    def __init__(self, queue: Queue, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.clock = clock
        self.cap = queue.concurrency
        self.rate: float | None = None
        self.capacity = 0.0
        self.tokens = 0.0
        self._at = clock()

    def share(self, owned: set[int], partitions: int) -> None:
        """The partition numbers this process owns now, of `partitions`."""
        queue = self.queue
        total = max(1, partitions)
        self.cap = queue.concurrency
        if queue.max_concurrency is not None:
            slots = sum(1 for i in range(queue.max_concurrency) if i % total in owned)
            self.cap = min(queue.concurrency, slots)
        if queue.rate_limit is None:
            self.rate = None
            return
        fraction = len(owned) / total
        self.rate = queue.rate_limit.jobs_per_s * fraction
        self.capacity = max(1.0, queue.rate_limit.burst * fraction) if owned else 0.0
        self.tokens = min(self.tokens, self.capacity)
        self._at = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        if self.rate is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Whether a job may start now (a token taken); always True without a rate limit."""
        if self.rate is None:
            return True
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token (0 without a rate limit or with one at hand)."""
        if self.rate is None:
            return 0.0
        self._refill()
        if self.tokens >= 1.0:
            return 0.0
        if self.rate <= 0:
            return 1.0
        return (1.0 - self.tokens) / self.rate
