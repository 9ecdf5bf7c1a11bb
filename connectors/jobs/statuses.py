"""Job statuses written in batches, and this process's own statuses known when read back.

A queue's loop writes two or more statuses a job (ACTIVE, then COMPLETED, FAILED or
DEAD). Produced one by one, each costs a batch, a future and an expiry timer of its own,
and each comes back through the status follower to be decoded and applied again. Here:

- `StatusWriter.write` collects the statuses of a loop turn (a few milliseconds) and
  produces them as one batch; a caller that must know its status is confirmed awaits
  the batch's future, or passes a callback that runs once the batch is confirmed (a
  job's bookkeeping after its final status, without a task waking up for each). A job's later status replaces an earlier one of the same batch
  that was not sent yet: the status topic is compacted by job id and each status holds
  the job's history, so the earlier record says nothing the later one does not. A job
  that finishes within the turn it started in (a fast function) has one record, not two.
- `Echoes` remembers the records sent and not yet read back. The follower skips a record
  it finds there (this process put that status in its table when it wrote it) instead
  of decoding and applying it again; anything else (another process's statuses) is
  applied as before.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from core.follower import Entry
from core.jobs import JobStatus

log = structlog.get_logger("sluice.jobs")

# How long a batch collects statuses before it is produced.
LINGER_S = 0.003

Send = Callable[[list[tuple[bytes | None, bytes | None, None]]], Awaitable[None]]
Then = Callable[[], Any]


class Echoes:
    """Records this process produced to a compacted topic and has not read back yet."""

    def __init__(self) -> None:
        self._sent: dict[bytes, list[bytes]] = {}
        self._lock = threading.Lock()

    def expect(self, key: bytes, value: bytes) -> None:
        """`value` under `key` is about to be produced."""
        with self._lock:
            self._sent.setdefault(key, []).append(value)

    def back(self, entry: Entry) -> bool:
        """Whether `entry` is one of ours coming back (it is forgotten then)."""
        if entry.key is None or entry.value is None:
            return False
        with self._lock:
            values = self._sent.get(entry.key)
            if not values:
                return False
            try:
                values.remove(entry.value)
            except ValueError:
                return False
            if not values:
                del self._sent[entry.key]
            return True


class StatusWriter:
    """Statuses produced a batch a loop turn, the latest of a job in a batch winning."""

    def __init__(
        self,
        send: Send,
        echoes: Echoes,
        queue: str,
        linger_s: float = LINGER_S,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._send = send
        self._echoes = echoes
        self._queue = queue
        self._linger_s = linger_s
        self._on_failure = on_failure
        self._pending: dict[str, tuple[JobStatus, bytes | None]] = {}
        self._then: list[Then] = []
        self._future: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def write(
        self, status: JobStatus, value: bytes | None = None, then: Then | None = None
    ) -> asyncio.Future[None]:
        """Produce `status` (`value`: its bytes, when the caller has them) with the next
        batch; the future resolves once Kafka confirmed it (or raises why it was not).
        `then` is called once it is confirmed (not when it was not: `on_failure` is)."""
        self._pending[status.id] = (status, value)
        if then is not None:
            self._then.append(then)
        if self._future is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._future = loop.create_future()
            self._future.add_done_callback(self._log_failure)
            self._timer = loop.call_later(self._linger_s, self._flush)
        return self._future

    def gathering(self) -> asyncio.Future[None] | None:
        """The future of the batch that statuses written now join (None: none yet)."""
        return self._future

    def _flush(self) -> None:
        self._timer = None
        pending, future, then = self._pending, self._future, self._then
        self._pending, self._future, self._then = {}, None, []
        if future is None:
            return
        assert self._loop is not None
        task = self._loop.create_task(self._produce(pending, future, then))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _produce(
        self,
        pending: dict[str, tuple[JobStatus, bytes | None]],
        future: asyncio.Future[None],
        then: list[Then],
    ) -> None:
        records: list[tuple[bytes | None, bytes | None, None]] = []
        for job_id, (status, known) in pending.items():
            key, value = job_id.encode(), known if known is not None else status.to_bytes()
            self._echoes.expect(key, value)
            records.append((key, value, None))
        try:
            await self._send(records)
        except Exception as exc:  # the callers' futures say why
            if not future.done():
                future.set_exception(exc)
            if self._on_failure is not None:
                self._on_failure(exc)
            return
        for call in then:
            try:
                call()
            except Exception as exc:  # one caller's bookkeeping does not stop the others'
                log.exception("after a status was written", queue=self._queue)
                if self._on_failure is not None:
                    self._on_failure(exc)
        if not future.done():
            future.set_result(None)

    async def drain(self) -> None:
        """Produce what is pending now and wait until every batch is confirmed."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    def _log_failure(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and (error := future.exception()) is not None:
            log.error("job statuses not written", queue=self._queue, error=repr(error))
