"""Leases: a queue's jobs handed to workers in any language over HTTP.

A queue with `executor: {type: lease}` is not run in the job worker: its loop starts a job
when a worker asks for it (`POST /v1/queues/<q>/lease`), by the same rules as any other
(priorities, ordering keys, the queue's limits, one process deciding about a job at a
time). The job is ACTIVE under a lease with an id and an end (`visibility_ms`); the
worker finishes it with `POST /v1/jobs/<id>/ack` or `/nack` naming the lease, or asks for
more time with `/extend`. A lease that ends first is an attempt that failed ("lease
expired" in the history): the job is retried with the queue's backoff, leased to
whoever asks next, and the first worker's late ack or nack gets `409`. An ack or nack
answers once the outcome is on the status topic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from connectors.jobs.executor import Fatal
from core.jobs import MAX_TEXT

# A result and a progress report go into the job's status record (and, sent on to another
# process, into a record header): bounded well below a Kafka record's limit. A status keeps
# a result cut to MAX_TEXT characters anyway.
MAX_RESULT_BYTES = 64 * 1024
MAX_PROGRESS_BYTES = MAX_TEXT


class LeaseExpired(Exception):
    """The lease ended before its worker acked or nacked the job."""


class Nacked(Exception):
    """The job's worker said the attempt failed (retried with the queue's backoff)."""


class FatalNack(Fatal):
    """The job's worker said the job can never succeed: no more attempts, DEAD."""


@dataclass(eq=False)
class Lease:
    """One attempt leased to an HTTP worker, until `until_ms` unless extended."""

    job_id: str
    until_ms: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # What the worker said: a result (ack) or an exception (nack); set once.
    outcome: asyncio.Future[Any] = field(default_factory=asyncio.Future)
    # The status the outcome ended in, once written (an ack or nack answers with it).
    written: asyncio.Future[Any] = field(default_factory=asyncio.Future)
    expired: bool = False

    def current(self, lease_id: str) -> bool:
        """Whether `lease_id` names this lease and it still holds (not ended, not used)."""
        return (
            lease_id == self.id
            and not self.expired
            and not self.outcome.done()
            and time.time() * 1000 < self.until_ms
        )

    async def result(self) -> Any:
        """The worker's result; raises its nack, or LeaseExpired when the lease ends."""
        while True:
            left = self.until_ms / 1000 - time.time()
            if left <= 0 and not self.outcome.done():
                self.expired = True
                raise LeaseExpired(f"the lease {self.id} ended before an ack or nack")
            try:
                return await asyncio.wait_for(asyncio.shield(self.outcome), max(0.0, left))
            except TimeoutError:
                continue  # extended meanwhile, or ended: the loop looks again
