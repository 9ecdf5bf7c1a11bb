"""One queue's loop in the job worker: jobs off their topics, run, and their outcome kept.

The queue's topics (`sluice.jobs.<q>.p<n>`, one per priority) are read by the consumer
group `<SLUICE_JOBS_CONSUMER_GROUP>-<q>`: Kafka shares their partitions between the
worker processes, and every record of a job (its submission, its retry copies, repeated
idempotent submits) is on one partition, so one process decides about it at a time.

A record read is handled by what the status table says of its job:

- finished (COMPLETED, DEAD, CANCELLED), or for an attempt older than the job's latest:
  nothing to do;
- ACTIVE under a lease that has not expired (another process ran it until a rebalance,
  or this one still does): looked at again when the lease ends;
- ACTIVE under an expired lease: that attempt failed (its worker is gone), so it counts,
  and the job goes on like any failed attempt;
- not due yet (`run_at`, `delay_ms`, a retry's backoff): held until it is, SCHEDULED;
- otherwise it is ready, and starts when its priority's turn and a free slot come.

Priorities share the starts by weight: while several priorities have jobs ready, each
priority p gets 2^p parts of the starts (stride scheduling), so priority 2 starts four
jobs for each of priority 0 and 0 is never starved. Within a priority and partition jobs
start in the order they were read. Jobs with an ordering key (the record key) run one at
a time in that order, also across retries: a later job of the key waits until the
earlier one is finished.

An attempt that fails is retried after the queue's backoff: a copy of the record, with
the next attempt and its due time in headers, is appended to the same partition, then
the FAILED status is written. A job whose attempts are spent, or whose function raised
`Fatal`, goes to the queue's DLQ with the failure headers of event DLQs, then DEAD. A
record's offset is committed only once everything that follows from it is confirmed by
Kafka; the records held (not due, waiting for a lease or a key) keep it from being
committed, and are read again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from confluent_kafka import Consumer, Message, TopicPartition

from connectors.jobs.executor import Fatal, JobCall, JobCancelled, JobContext, JobTimeout
from connectors.jobs.leases import (
    MAX_PROGRESS_BYTES,
    MAX_RESULT_BYTES,
    FatalNack,
    Lease,
    LeaseExpired,
    Nacked,
)
from connectors.jobs.limits import Limits
from connectors.jobs.metrics import JobMetrics
from connectors.jobs.retention import Retention
from connectors.jobs.statuses import Echoes, StatusWriter
from core.config import LeaseExecutor, Queue, Schedule
from core.errors import BrokerUnavailable
from core.follower import CompactedFollower, Entry
from core.headers import (
    Failure,
    Origin,
    failure_headers,
    header_map,
    int_header,
    message_headers,
    origin_of,
)
from core.jobs import (
    ACTIVE,
    ATTEMPT,
    CANCEL,
    CANCELLED,
    COMPLETED,
    DEAD,
    DUE,
    FAILED,
    LEASE_CALL,
    MAX_TEXT,
    REDRIVE,
    SCHEDULE_GRACE_MS,
    SCHEDULED,
    JobStatus,
    StatusTable,
    cut,
    next_tick,
    redrive_step,
    tick_id,
    ticks,
)
from core.producer import EventProducer
from core.settings import JobSettings, KafkaSettings
from core.topics import Topics
from core.watchdog import StallWatchdog
from schemas.codec import AvroCodec

log = structlog.get_logger("sluice.jobs")

TP = tuple[str, int]
STAGE = "job"
# How long a read waits when nothing is to be done: librdkafka's `consume` returns after
# this long even when a record came sooner (unless a whole batch came), so it is what a
# job submitted to an idle queue waits before it starts, on average half of it.
IDLE_WAIT_S = 0.02
# Records a read takes at most.
READ_BATCH = 500
# How often the attempts running here are looked at: a timeout ends an attempt at most
# this long after it is over.
WATCH_EVERY_S = 0.1
# How long the loop waits before it reads again while it has jobs enough ready.
HOLD_S = 0.005
# How long at most it does so before it pauses the partitions and reads on: a consumer
# that does not read does not take part in a rebalance either (the group waits for it),
# and jobs that run fast enough to need the read-ahead start 10,000 in well under this.
HOLD_LIMIT_S = 2.0
# How often at most a running job's progress is written to its status.
PROGRESS_EVERY_S = 0.5
# How often the loop commits what is finished.
COMMIT_EVERY_S = 0.5
# Stride scheduling: priority p advances by STRIDE / 2^p per start.
STRIDE = 1 << 20


class Held:
    """A job record read and not finished: its job, attempt and due time."""

    __slots__ = ("attempt", "due_ms", "headers", "id", "job", "key", "msg", "tp")

    def __init__(
        self,
        msg: Message,
        job: dict[str, Any],
        attempt: int,
        due_ms: int,
        headers: dict[str, str],
        tp: TP,
    ) -> None:
        self.msg = msg
        self.job = job
        self.attempt = attempt
        self.due_ms = due_ms
        self.headers = headers  # the record's headers, as text
        self.id: str = str(job["job_id"])  # the job's id
        self.tp = tp  # (topic, partition) it was read from
        key = job.get("ordering_key")
        self.key: str | None = None if key is None else str(key)  # its ordering key


class _Running:
    """An attempt whose function runs in this process: what renews its lease, ends it at
    its timeout or cancel, and writes its progress."""

    __slots__ = (
        "attempt",
        "cancelled",
        "deadline",
        "progress",
        "progress_at",
        "task",
        "timed_out",
    )

    def __init__(self, attempt: int, deadline: float, task: asyncio.Task[None] | None) -> None:
        self.attempt = attempt
        self.deadline = deadline  # time.monotonic()
        self.task = task
        self.timed_out = False
        self.cancelled = False
        self.progress: dict[str, Any] | None = None  # reported and not written yet
        self.progress_at = 0.0  # when progress was last written (time.monotonic())

    def end(self, cancelled: bool) -> None:
        """End the attempt now: at its timeout, or cancelled."""
        if self.task is not None and not (self.timed_out or self.cancelled):
            self.cancelled = cancelled
            self.timed_out = not cancelled
            self.task.cancel()


@dataclass
class Offsets:
    """One partition's offsets read and not finished: the position to commit."""

    open: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)
    next: int | None = None

    def read(self, offset: int) -> None:
        """A record was read."""
        self.open.add(offset)
        heapq.heappush(self.heap, offset)
        self.next = max(self.next or 0, offset + 1)

    def finish(self, offset: int) -> None:
        """Everything that follows from the record is confirmed."""
        self.open.discard(offset)

    def position(self) -> int | None:
        """The offset to commit: the first not finished, or after the last read."""
        while self.heap and self.heap[0] not in self.open:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else self.next


class Strides:
    """Which priority starts next: each ready priority p by weight 2^p (stride scheduling)."""

    def __init__(self, priorities: int) -> None:
        self.passes = [0] * priorities

    def pick(self, ready: list[deque[Held]]) -> int | None:
        """The priority whose job starts next, or None when none is ready."""
        best: int | None = None
        for p, jobs in enumerate(ready):
            if jobs and (best is None or self.passes[p] < self.passes[best]):
                best = p
        if best is not None:
            self.passes[best] += STRIDE >> best
        return best

    def woke(self, priority: int, ready: list[deque[Held]]) -> None:
        """`priority` has jobs again: it starts from where the busy ones are, no credit."""
        active = [self.passes[p] for p, jobs in enumerate(ready) if jobs and p != priority]
        if active:
            self.passes[priority] = max(self.passes[priority], min(active))


class QueueWorker:
    """Runs the jobs of one queue that Kafka gives this process."""

    def __init__(
        self,
        queue: Queue,
        call: JobCall | None,
        kafka: KafkaSettings,
        settings: JobSettings,
        metrics: JobMetrics,
        codec: AvroCodec,
        worker_id: str | None = None,
    ) -> None:
        self.queue = queue
        self.call = call
        self.kafka = kafka
        self.settings = settings
        self.metrics = metrics
        self.codec = codec
        self.worker_id = worker_id or f"{uuid.uuid4().hex[:12]}"
        topics = Topics(kafka.topic_prefix)
        self.topics = topics.queue(queue.name)
        self.status_topic = topics.jobs_status
        self.priority_of = {self.topics.priority(p): p for p in range(queue.priorities)}
        self.table = StatusTable()
        self.retention = Retention(queue, self.table, self.status_topic, metrics)
        self.watchdog = StallWatchdog(f"jobs-{queue.name}", settings.stall_after_s)
        self._ready: list[deque[Held]] = [deque() for _ in range(queue.priorities)]
        self._strides = Strides(queue.priorities)
        self._held: list[tuple[int, int, Held]] = []  # (due ms, sequence, record)
        self._seq = itertools.count()
        self._offsets: dict[TP, Offsets] = {}
        self._claimed: dict[str, Held] = {}  # job id -> the record being run or ready
        self._behind: dict[str, list[Held]] = {}  # records of a claimed job, read meanwhile
        self._keys: dict[str, Held] = {}  # ordering key -> the record of the job that has it
        self._key_waiting: dict[str, deque[Held]] = {}
        self._running: set[asyncio.Task[None]] = set()
        # Attempts whose function runs now: what the concurrency limits count. An attempt's
        # slot is free when its function returned, while its outcome is still being written.
        self._busy = 0
        self._token_timer: asyncio.TimerHandle | None = None
        self._leases: dict[str, Lease] = {}  # job id -> its attempt leased over HTTP
        self._started: set[str] = set()  # ids of the jobs whose attempt runs here now
        self._writes: set[asyncio.Task[None]] = set()
        # Statuses go out a batch a loop turn; the follower skips the ones this process wrote.
        self._echoes = Echoes()
        self._statuses = StatusWriter(
            lambda records: self._send(self.status_topic, records),
            self._echoes,
            queue.name,
            on_failure=self._bookkeeping_failed,
        )
        # Attempts run here by the job's function, their leases renewed, their timeouts kept.
        self._beating: dict[str, _Running] = {}
        name = queue.name
        self._started_total = metrics.started.labels(name)
        self._completed_total = metrics.completed.labels(name)
        self._wait_seconds = metrics.wait_seconds.labels(name)
        self._run_seconds = metrics.run_seconds.labels(name)
        # Started and completed since the counters were last added to (once a loop turn).
        self._started_n = 0
        self._completed_n = 0
        self._paused: set[int] = set()  # priorities paused
        self._hold_since: float | None = None  # since when the loop has not read
        self._assigned: set[TP] = set()
        self._new_partitions = False
        self.limits = Limits(queue)
        # Between a revoke and the next assignment nothing starts (the cap holds then).
        self._rebalancing = False
        # The next tick of each schedule, while this process owns them (None: it does not).
        self._next_ticks: dict[str, int] | None = None
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        self._producer: EventProducer | None = None
        self._follower: CompactedFollower | None = None
        self.failure: str | None = None

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Read, run and record jobs until stopped."""
        loop = self._loop = asyncio.get_running_loop()
        self._producer = EventProducer(self.kafka, timeout_s=30.0)
        follower = self._follower = CompactedFollower(
            self.kafka, self.status_topic, self._apply_status, name=f"jobs-{self.queue.name}"
        )
        follower.start()
        if not await loop.run_in_executor(None, follower.wait_caught_up, 120.0):
            raise RuntimeError(f"{self.status_topic} was not read to its end within 120 s")
        consumer = self._consumer = Consumer(
            self.kafka.client_config()
            | {
                "group.id": f"{self.settings.consumer_group}-{self.queue.name}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.settings.session_timeout_ms,
                # A member hears of a rebalance (a process left or came) with its next
                # heartbeat: often, so that jobs due meanwhile are not held up for long.
                "heartbeat.interval.ms": min(300, self.settings.session_timeout_ms // 3),
                "max.poll.interval.ms": 300_000,
                # Submit-to-start latency on an idle queue: a fetch waits at most this long.
                "fetch.wait.max.ms": 50,
            }
        )
        consumer.subscribe(
            list(self.priority_of), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        last_commit = 0.0
        renewing = loop.create_task(self._watch_attempts())
        try:
            while not self._stopping.is_set():
                if self._holding():
                    # Jobs enough ready: they run meanwhile; librdkafka keeps what it read
                    # ahead (a paused partition would drop it).
                    await asyncio.sleep(HOLD_S)
                    msgs = []
                else:
                    wait = self._poll_wait()
                    msgs = await loop.run_in_executor(None, consumer.consume, READ_BATCH, wait)
                if self._new_partitions:
                    # Statuses other processes wrote for the jobs of these partitions.
                    self._new_partitions = False
                    await loop.run_in_executor(None, follower.sync, 30.0)
                for msg in msgs:
                    self._read(msg)
                self._fire_schedules()
                self._release_due()
                self._dispatch()
                self._flow()
                self._gauges()
                self.retention.sweep(self._assigned, self._producer)
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    # A lease queue's ready jobs wait for HTTP workers: not a stall.
                    self.watchdog.lag(self._due_count() if self.call is not None else 0)
                    await loop.run_in_executor(None, self._commit, None)
                    last_commit = time.monotonic()
            await self._drain()
            self._gauges()
            await loop.run_in_executor(None, self._commit, None)
        finally:
            renewing.cancel()
            if self.call is not None:
                await self.call.close()
            self.watchdog.lag(0)
            await loop.run_in_executor(None, consumer.close)
            await loop.run_in_executor(None, follower.stop)
            await loop.run_in_executor(None, self._producer.close)

    def stop(self) -> None:
        """Start no more jobs; the running ones finish, their offsets are committed."""
        self._stopping.set()

    def problem(self) -> str | None:
        """Why this queue's loop is not ready (stalled, its status topic unread), or None."""
        if self.failure is not None:
            return self.failure
        if self._follower is not None and (problem := self._follower.problem()) is not None:
            return str(problem)
        return self.watchdog.problem()

    def _poll_wait(self) -> float:
        if any(self._ready) and self._busy < self.limits.cap:
            wait = self.limits.wait()
            if wait <= 0:
                return 0.0
            return min(0.1, wait)
        if self._held:
            return max(0.0, min(IDLE_WAIT_S, self._held[0][0] / 1000 - time.time()))
        return IDLE_WAIT_S

    async def _drain(self) -> None:
        """Wait for the running jobs (their outcome is written) before the last commit."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._statuses.drain()

    def _apply_status(self, entry: Entry) -> None:
        """A record of the status topic, unless it is one this process wrote (and put in
        its table then)."""
        if not self._echoes.back(entry):
            self.table.apply(entry)

    # -- schedules -----------------------------------------------------------------------

    def _fire_schedules(self) -> None:
        """Submit the jobs of the schedules' ticks that came, if this process fires them.

        The owner of partition 0 of the queue's priority-0 topic fires them (Kafka gives it
        to one process of the group). A tick's job id is derived from the tick, so a tick
        fired twice (by an old and a new owner around a rebalance) is one job: both records
        are on one partition, and the second is skipped as a copy.
        """
        schedules = self.queue.schedules
        if not schedules:
            return
        if (self.topics.priority(0), 0) not in self._assigned:
            self._next_ticks = None
            return
        now_ms = int(time.time() * 1000)
        if self._next_ticks is None:
            self._next_ticks = {s.name: self._first_tick(s, now_ms) for s in schedules}
        for schedule in schedules:
            tick = self._next_ticks[schedule.name]
            while tick <= now_ms:
                self._fire(schedule, tick)
                tick = next_tick(schedule.cron, tick)
            self._next_ticks[schedule.name] = tick

    def _first_tick(self, schedule: Schedule, now_ms: int) -> int:
        """Where a new owner of the schedules starts: after the last tick fired (catch-up),
        or a few seconds back (a tick the previous owner may have missed)."""
        if schedule.catch_up and (last := self._last_fired(schedule)) is not None:
            missed = ticks(schedule.cron, last, now_ms, schedule.max_catch_up)
            if missed:
                return missed[0]
        recent = ticks(schedule.cron, now_ms - SCHEDULE_GRACE_MS, now_ms, 1000)
        return recent[0] if recent else next_tick(schedule.cron, now_ms)

    def _last_fired(self, schedule: Schedule) -> int | None:
        tag = f"schedule:{schedule.name}"
        last: int | None = None
        for status in self.table.select(self.queue.name, None, 1 << 62):
            if tag in status.tags:
                for other in status.tags:
                    if other.startswith("tick:") and other[5:].isdigit():
                        last = max(last or 0, int(other[5:]))
        return last

    def _fire(self, schedule: Schedule, tick_ms: int) -> None:
        job_id = tick_id(self.queue.name, schedule.name, tick_ms)
        value = self.codec.encode(
            {
                "job_id": job_id,
                "queue": self.queue.name,
                "priority": schedule.priority,
                "payload": orjson.dumps(schedule.payload).decode(),
                "submitted_at": tick_ms,
                "run_at": None,
                "max_attempts": None,
                "timeout_ms": None,
                "idempotency_key": None,
                "ordering_key": None,
                "tags": [f"schedule:{schedule.name}", f"tick:{tick_ms}"],
            }
        )
        topic = self.topics.priority(schedule.priority)
        self._spawn_write(self._send(topic, [(job_id.encode(), value, None)]))
        self.metrics.fired.labels(self.queue.name).inc()

    # -- records read ----------------------------------------------------------------------

    def _read(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            log.warning("consume error", queue=self.queue.name, error=err.str())
            return
        tp = (msg.topic() or "", msg.partition() or 0)
        if tp not in self._assigned:
            return
        offsets = self._offsets.get(tp)
        if offsets is None:
            offsets = self._offsets[tp] = Offsets()
        offsets.read(msg.offset() or 0)
        headers = header_map(message_headers(msg))
        if (cancelled := headers.get(CANCEL)) is not None:
            self._cancel(msg, tp, cancelled)
            return
        if (call := headers.get(LEASE_CALL)) is not None:
            self._offsets[tp].finish(msg.offset() or 0)
            self._lease_call(call)
            return
        try:
            job = self.codec.decode(msg.value() or b"")
            if not isinstance(job, dict) or not job.get("job_id"):
                raise ValueError("the record holds no job id")
        except Exception as exc:
            self._spawn_write(self._dead_letter_raw(msg, exc))
            return
        attempt = int_header(headers, ATTEMPT) or 1
        due = int_header(headers, DUE)
        if due is None:
            due = int(job.get("run_at") or 0)
        self._consider(Held(msg, job, attempt, due, headers, tp))

    def _redriven(self, held: Held) -> tuple[JobStatus | None, bool]:
        """The job's status for this record, started over (and written) when the record
        redrives the DEAD job, and whether the record is a leftover of an earlier run."""
        marker = held.headers.get(REDRIVE)
        status = self.table.get(held.id)
        now_ms = int(time.time() * 1000)
        went_on, leftover = redrive_step(status, marker, self.worker_id, now_ms)
        if went_on is not None and went_on is not status:
            log.info("job redriven", queue=self.queue.name, job=held.id, marker=marker)
            # In the table at once: the job may start before the write task runs.
            self.table.put(went_on)
            self._write_soon(went_on)
        return went_on, leftover

    def _consider(self, held: Held) -> None:  # noqa: PLR0911 -- one return per outcome
        """Decide about a record from its job's status: done, held, given up on, or ready."""
        now_ms = int(time.time() * 1000)
        status, leftover = self._redriven(held)
        if status is not None and (leftover or status.finished or held.attempt < status.attempt):
            self._finish(held)
            self.metrics.duplicates.labels(self.queue.name).inc()
            return
        if held.id in self._claimed:
            self._behind.setdefault(held.id, []).append(held)
            return
        if status is not None and status.state == ACTIVE:
            lease_until = status.lease_until_ms or 0
            if lease_until > now_ms:
                self._hold(held, lease_until + 50)
                return
            # Its worker is gone: the attempt failed and counts.
            self.metrics.lease_expiries.labels(self.queue.name).inc()
            self._take_key(held)
            self._claim(held)
            self._spawn_run(self._failed(held, status, TimeoutError("the lease expired"), True))
            return
        if status is not None and status.state == FAILED and held.attempt <= status.attempt:
            # The retry copy is further on in the partition; an ordering key waits for it.
            self._finish(held)
            if (key := held.key) is not None and key not in self._keys:
                self._keys[key] = held
            return
        if held.attempt > self._max_attempts(held):
            self._take_key(held)
            self._claim(held)
            error = RuntimeError(f"no attempts left ({held.attempt - 1} made)")
            self._spawn_run(self._dead(held, status, error))
            return
        if held.due_ms > now_ms:
            if status is None:
                # A job submitted to run later (a retry's wait shows as FAILED, with its due).
                self._write_soon(self._status(held, status, SCHEDULED, due_ms=held.due_ms))
            self._hold(held, held.due_ms)
            return
        key = held.key
        if key is not None:
            owner = self._keys.get(key)
            if owner is not None and owner.id != held.id:
                self._key_waiting.setdefault(key, deque()).append(held)
                return
            self._keys[key] = held
        self._claim(held)
        priority = self.priority_of.get(held.tp[0], 0)
        if not self._ready[priority]:
            self._strides.woke(priority, self._ready)
        self._ready[priority].append(held)

    def _cancel(self, marker: Message, tp: TP, job_id: str) -> None:
        """A cancel request (sent to every partition of the queue): the partition that has
        the job cancels it unless an attempt runs; nothing runs it afterwards."""
        status = self.table.get(job_id)
        mine = self._local(job_id, tp)
        ours = status is not None and (status.topic, status.partition) == tp
        offset = marker.offset() or 0
        if job_id in self._started and mine is not None and self._claimed.get(job_id) is mine:
            # An attempt of it runs here: it ends, and the job is CANCELLED, not retried.
            self._offsets[tp].finish(offset)
            self._end_running(job_id)
            return
        if (
            (mine is None and not ours)
            or (status is not None and status.finished)
            or job_id in self._started
        ):
            self._offsets[tp].finish(offset)
            return
        if mine is not None and self._claimed.get(job_id) is mine:
            # Read and due, not started: it leaves the ready jobs.
            for jobs in self._ready:
                if mine in jobs:
                    jobs.remove(mine)
            del self._claimed[job_id]
            self._finish(mine)
        now_ms = int(time.time() * 1000)
        if status is not None:
            cancelled = status.moved(CANCELLED, now_ms, worker=self.worker_id, due_ms=None)
        else:
            assert mine is not None
            cancelled = self._status(mine, None, CANCELLED, due_ms=None)
        # In the table at once: a held record of the job that comes due now is skipped.
        self.table.put(cancelled)
        self._spawn_write(self._cancelled(cancelled, tp, offset))

    def _end_running(self, job_id: str) -> None:
        """Cancel the attempt of `job_id` that runs here (in-process or leased)."""
        running = self._beating.get(job_id)
        if running is not None:
            running.end(cancelled=True)
            return
        lease = self._leases.get(job_id)
        if lease is not None and not lease.outcome.done():
            # Its HTTP worker's ack or nack gets 409 from now on (the lease is used).
            lease.outcome.set_exception(JobCancelled("cancelled while it ran"))

    def _local(self, job_id: str, tp: TP) -> Held | None:
        """A record of the job this loop holds (ready, not due, behind a key), if any."""
        claimed = self._claimed.get(job_id)
        if claimed is not None and claimed.tp == tp:
            return claimed
        for _, _, held in self._held:
            if held.id == job_id and held.tp == tp:
                return held
        for waiting in self._key_waiting.values():
            for held in waiting:
                if held.id == job_id and held.tp == tp:
                    return held
        return None

    async def _cancelled(self, cancelled: JobStatus, tp: TP, offset: int) -> None:
        await self._write(cancelled)
        self.metrics.cancelled.labels(self.queue.name).inc()
        offsets = self._offsets.get(tp)
        if offsets is not None:
            offsets.finish(offset)
        # An ordering key it held (a retry it waited for) goes to the next job of the key.
        for key, owner in list(self._keys.items()):
            if owner.id == cancelled.id:
                del self._keys[key]
                waiting = self._key_waiting.pop(key, deque())
                while waiting:
                    self._consider(waiting.popleft())
        self._dispatch()

    def _claim(self, held: Held) -> None:
        self._claimed[held.id] = held

    def _take_key(self, held: Held) -> None:
        if (key := held.key) is not None:
            self._keys[key] = held

    def _hold(self, held: Held, due_ms: int) -> None:
        heapq.heappush(self._held, (due_ms, next(self._seq), held))

    def _release_due(self) -> None:
        now_ms = int(time.time() * 1000)
        while self._held and self._held[0][0] <= now_ms:
            _, _, held = heapq.heappop(self._held)
            if held.tp in self._assigned:
                self._consider(held)

    def _finish(self, held: Held) -> None:
        offsets = self._offsets.get(held.tp)
        if offsets is not None:
            offsets.finish(held.msg.offset() or 0)
        self.watchdog.progress()

    def _settled(self, held: Held, key_done: bool) -> None:
        """The record's outcome is written: free its id (and its ordering key when done)."""
        self._finish(held)
        self._started.discard(held.id)
        if self._claimed.get(held.id) is held:
            del self._claimed[held.id]
        for later in self._behind.pop(held.id, []):
            self._consider(later)
        key = held.key
        owner = self._keys.get(key) if key is not None else None
        if key is not None and key_done and owner is not None and owner.id == held.id:
            del self._keys[key]
            waiting = self._key_waiting.get(key)
            while waiting and key not in self._keys:
                self._consider(waiting.popleft())
            if waiting is not None and not waiting:
                del self._key_waiting[key]
        self._dispatch()

    # -- starting and running ----------------------------------------------------------------

    def _dispatch(self) -> None:
        if self.call is None:
            return  # a lease queue: its jobs start when HTTP workers ask for them
        loop = self._loop
        assert loop is not None
        while (ready := self._next_ready()) is not None:
            # A task of its own, without the bookkeeping of `_spawn_run`: the attempt
            # takes itself off the running ones when its function returned.
            task = loop.create_task(self._attempt_here(*ready))
            self._running.add(task)
        if any(self._ready) and self._busy < self.limits.cap and not self._rebalancing:
            self._dispatch_later(self.limits.wait())  # waiting for the rate limit's token

    def _next_ready(self) -> tuple[Held, JobStatus | None] | None:
        """The next job to start (its slot and token taken), by priority; None for none now."""
        if self._stopping.is_set() or self._rebalancing:
            return None
        while self._busy < self.limits.cap and any(self._ready):
            if not self.limits.take():
                self.metrics.rate_limited.labels(self.queue.name).inc()
                return None
            priority = self._strides.pick(self._ready)
            if priority is None:
                return None
            held = self._ready[priority].popleft()
            status = self.table.get(held.id)
            if status is not None and status.finished:
                # Cancelled (or finished by someone else) while it waited its turn.
                self._settled(held, key_done=True)
                continue
            self._started.add(held.id)
            self._busy += 1
            return held, status
        return None

    # -- leases over HTTP (queues with `executor: {type: lease}`) --------------------------

    async def lease(
        self, max_jobs: int, visibility_ms: int, wait_s: float
    ) -> list[tuple[JobStatus, Any]]:
        """Start up to `max_jobs` jobs under leases of `visibility_ms`, waiting up to
        `wait_s` for the first; their ACTIVE statuses (with the lease ids) and payloads."""
        deadline = time.monotonic() + wait_s
        leased: list[tuple[JobStatus, Any]] = []
        while True:
            while len(leased) < max_jobs and (ready := self._next_ready()) is not None:
                held, status = ready
                lease = Lease(held.id, int(time.time() * 1000) + visibility_ms)
                self._leases[held.id] = lease
                active = self._start(held, status, lease)
                self._spawn_run(self._run(held, status, lease, active))
                leased.append((active, _payload(held)))
            if leased or time.monotonic() >= deadline or self._stopping.is_set():
                if leased:
                    self.metrics.leased.labels(self.queue.name).inc(len(leased))
                    # The ACTIVE statuses confirmed before the worker hears of its leases:
                    # a call to another process finds them there, a restart keeps them.
                    if (batch := self._statuses.gathering()) is not None:
                        await asyncio.shield(batch)
                return leased
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def running_lease(self, job_id: str, lease_id: str) -> Lease | None:
        """The lease `lease_id` of `job_id` when this process holds it and it holds still."""
        lease = self._leases.get(job_id)
        return lease if lease is not None and lease.current(lease_id) else None

    def extend(self, lease: Lease, visibility_ms: int, progress: Any) -> JobStatus:
        """The lease ends `visibility_ms` from now instead; its status says so."""
        lease.until_ms = int(time.time() * 1000) + visibility_ms
        current = self.table.get(lease.job_id)
        assert current is not None
        changes: dict[str, Any] = {"lease_until_ms": lease.until_ms}
        if progress is not None:
            changes["progress"] = progress
        extended = current._replace(**changes)
        self._write_soon(extended)
        self.metrics.extended.labels(self.queue.name).inc()
        return extended

    async def catch_up(self, timeout_s: float = 5.0) -> None:
        """Read the status topic to its current end (what other processes wrote just now)."""
        follower = self._follower
        if follower is not None:
            await asyncio.get_running_loop().run_in_executor(None, follower.sync, timeout_s)

    async def forward(self, status: JobStatus, call: dict[str, Any]) -> None:
        """Send a lease call for a lease another process holds to the job's partition."""
        marker = orjson.dumps({"job_id": status.id, **call})
        await self._send(
            status.topic, [(status.id.encode(), None, [(LEASE_CALL, marker)])], status.partition
        )

    def _lease_call(self, raw: str) -> None:
        """A lease call forwarded by another process: applied if this one holds the lease.

        It is checked as the HTTP API checks a call (any Kafka client that may write the
        queue's topics can send one): a call that does not hold is logged and dropped.
        """
        executor = self.queue.executor
        longest = (
            int(executor.max_visibility_s * 1000) if isinstance(executor, LeaseExecutor) else 0
        )
        try:
            call = orjson.loads(raw)
            job_id, lease_id, op = str(call["job_id"]), str(call["lease_id"]), call["op"]
            visibility = call.get("visibility_ms")
            if op == "extend" and (
                isinstance(visibility, bool)
                or not isinstance(visibility, int)
                or not 1 <= visibility <= longest
            ):
                raise ValueError(f"visibility_ms must be 1 to {longest}")
            if len(orjson.dumps(call.get("progress"))) > MAX_PROGRESS_BYTES:
                raise ValueError("progress too big")
            if len(orjson.dumps(call.get("result"))) > MAX_RESULT_BYTES:
                raise ValueError("result too big")
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            log.warning("lease call dropped", queue=self.queue.name, reason=str(exc))
            return
        lease = self.running_lease(job_id, lease_id)
        if lease is None:
            return  # not held here (any more): the caller sees no change and answers 409
        if op == "extend":
            self.extend(lease, visibility, call.get("progress"))
        elif op == "ack":
            self._spawn_write(self.finish(lease, call.get("result")))
        elif op == "nack":
            reason = str(call.get("error") or "nacked by its worker")
            error = FatalNack(reason) if call.get("fatal") else Nacked(reason)
            self._spawn_write(self.finish(lease, error))

    async def finish(self, lease: Lease, outcome: Any | BaseException) -> JobStatus:
        """Ack (a result) or nack (an exception) the leased attempt; the status written."""
        if isinstance(outcome, BaseException):
            lease.outcome.set_exception(outcome)
            self.metrics.nacked.labels(self.queue.name).inc()
        else:
            lease.outcome.set_result(outcome)
            self.metrics.acked.labels(self.queue.name).inc()
        written: JobStatus = await asyncio.shield(lease.written)
        return written

    def _dispatch_later(self, seconds: float) -> None:
        """Dispatch again when the next token comes, not when the next poll returns."""
        loop = self._loop
        if loop is None or (self._token_timer is not None and not self._token_timer.cancelled()):
            return

        def again() -> None:
            self._token_timer = None
            self._dispatch()

        self._token_timer = loop.call_later(max(0.001, seconds), again)

    def _spawn_run(self, work: Any) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._bookkeeping_failed(error)

    def _bookkeeping_failed(self, error: BaseException) -> None:
        """What follows from a job went wrong (a status not written): the loop is not
        ready any more (`/ready` says why)."""
        self.failure = f"queue {self.queue.name}: a job's bookkeeping failed: {error!r}"
        log.error("job bookkeeping failed", queue=self.queue.name, error=repr(error))

    def _max_attempts(self, held: Held) -> int:
        return int(held.job.get("max_attempts") or self.queue.max_attempts)

    def _timeout_s(self, held: Held) -> float:
        timeout_ms = held.job.get("timeout_ms")
        return float(timeout_ms) / 1000 if timeout_ms else self.queue.timeout_s

    def _start(self, held: Held, status: JobStatus | None, lease: Lease | None) -> JobStatus:
        """The attempt's ACTIVE status, written (without waiting)."""
        now = time.time()
        now_ms = int(now * 1000)
        active = self._status(
            held,
            status,
            ACTIVE,
            worker=self.worker_id,
            lease_until_ms=lease.until_ms if lease else now_ms + int(self.queue.lease_s * 1000),
            lease_id=lease.id if lease else None,
            started_at_ms=now_ms,
            error=None,
            progress=None,
        )
        self._write_soon(active)
        self._started_n += 1
        waited_from = max(held.due_ms, int(held.job.get("submitted_at") or now_ms))
        self._wait_seconds.observe(max(0.0, now - waited_from / 1000))
        return active

    async def _run(
        self, held: Held, status: JobStatus | None, lease: Lease, active: JobStatus
    ) -> None:
        """A leased attempt: its outcome is what the HTTP worker acks or nacks."""
        failure: Exception | None = None
        encoded = b"null"
        now = time.time()
        try:
            try:
                encoded = orjson.dumps(await lease.result())
            except Exception as exc:
                failure = exc
            finally:
                self._run_seconds.observe(time.time() - now)
                self._busy -= 1
                self._dispatch()
            done = await self._ended(held, active, failure, encoded)
            if done is not None:
                await done
        finally:
            if self._leases.get(held.id) is lease:
                del self._leases[held.id]
            if not lease.written.done():
                lease.written.set_result(self.table.get(held.id))

    async def _attempt_here(self, held: Held, status: JobStatus | None) -> None:
        """An attempt run by the queue's function in this process."""
        loop = self._loop
        task = asyncio.current_task(loop)
        try:
            active = self._start(held, status, None)
            call = self.call
            assert call is not None
            timeout_s = self._timeout_s(held)
            now = time.time()
            running = _Running(active.attempt, time.monotonic() + timeout_s, task)
            self._beating[held.id] = running
            failure: Exception | None = None
            encoded = b"null"
            try:
                payload = orjson.loads(held.job.get("payload") or "null")
                context = self._context(held, running) if call.with_context else None
                encoded = orjson.dumps(await call(payload, context))
            except asyncio.CancelledError:
                if running.cancelled:
                    failure = JobCancelled("cancelled while it ran")
                elif running.timed_out:
                    self.metrics.timed_out.labels(self.queue.name).inc()
                    failure = JobTimeout(f"the attempt ran over its timeout of {timeout_s:g} s")
                else:
                    raise
            except Exception as exc:
                failure = exc
            finally:
                if running.progress is not None:
                    self._write_progress(held.id, running)  # the last report, not dropped
                del self._beating[held.id]
                self._run_seconds.observe(time.time() - now)
                # The slot is free now; the outcome is written while the next job runs.
                self._busy -= 1
                self._dispatch()
            await self._ended(held, active, failure, encoded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._bookkeeping_failed(exc)
        finally:
            self._running.discard(task)

    def _context(self, held: Held, running: _Running) -> JobContext:
        left_s = running.deadline - time.monotonic()
        return JobContext(
            held.id,
            self.queue.name,
            held.attempt,
            self._max_attempts(held),
            self.priority_of.get(held.tp[0], 0),
            tuple(held.job.get("tags") or ()),
            int((time.time() + left_s) * 1000),
            functools.partial(self._report, held.id, running),
        )

    def _report(self, job_id: str, running: _Running, fraction: float, message: str | None) -> None:
        # A function run in a thread reports from there: onto the loop first.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._progress, job_id, running, fraction, message)

    def _progress(
        self, job_id: str, running: _Running, fraction: float, message: str | None
    ) -> None:
        """A running job reported progress: into its status now, or (at most every
        PROGRESS_EVERY_S) when the attempts are looked at next."""
        if self._beating.get(job_id) is not running:
            return  # reported after its attempt ended
        progress: dict[str, Any] = {"fraction": fraction, "percent": round(fraction * 100, 1)}
        if message is not None:
            progress["message"] = message[: MAX_PROGRESS_BYTES // 2]
        running.progress = progress
        if time.monotonic() - running.progress_at >= PROGRESS_EVERY_S:
            self._write_progress(job_id, running)

    def _write_progress(self, job_id: str, running: _Running) -> None:
        current = self.table.get(job_id)
        progress, running.progress = running.progress, None
        running.progress_at = time.monotonic()
        if current is None or current.state != ACTIVE or current.attempt != running.attempt:
            return
        self._write_soon(current._replace(progress=progress))

    async def _ended(
        self, held: Held, active: JobStatus, failure: Exception | None, encoded: bytes
    ) -> asyncio.Future[None] | None:
        """What follows from an attempt's outcome. A completed one is settled once its
        status is confirmed, without waiting here: the future says when."""
        if failure is not None:
            if isinstance(failure, JobCancelled):
                await self._cancelled_running(held, failure)
                return None
            self.metrics.failed.labels(self.queue.name).inc()
            if isinstance(failure, Fatal):
                await self._dead(held, self.table.get(held.id), failure)
            elif isinstance(failure, LeaseExpired):
                self.metrics.lease_expiries.labels(self.queue.name).inc()
                await self._failed(held, self.table.get(held.id), failure, False, "lease expired")
            else:
                await self._failed(held, self.table.get(held.id), failure, False)
            return None
        current = self.table.get(held.id) or active
        done = self._status(
            held,
            current,
            COMPLETED,
            result=orjson.loads(encoded) if len(encoded) <= MAX_TEXT else cut(encoded.decode()),
            lease_until_ms=None,
        )
        return self._write_soon(done, functools.partial(self._completed, held))

    async def _cancelled_running(self, held: Held, reason: JobCancelled) -> None:
        """An attempt ended by a cancel: CANCELLED, never retried."""
        cancelled = self._status(
            held,
            self.table.get(held.id),
            CANCELLED,
            error=cut(f"{type(reason).__name__}: {reason}"),
            lease_until_ms=None,
            due_ms=None,
        )
        await self._write(cancelled)
        self.metrics.cancelled.labels(self.queue.name).inc()
        self._settled(held, key_done=True)

    def _completed(self, held: Held) -> None:
        self._completed_n += 1
        self._settled(held, key_done=True)

    async def _watch_attempts(self) -> None:
        """End the attempts running here that are over their timeout, and extend the
        lease of each once a third of it has passed.

        One loop for all of them: timeouts are looked at every `WATCH_EVERY_S`, leases
        every sixth of the lease, so a lease is renewed at most half of it after the last
        renewal and never runs out while its function runs.
        """
        lease_ms = int(self.queue.lease_s * 1000)
        every_ms = max(200, lease_ms // 3)
        next_renewal = 0.0
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            now = time.monotonic()
            for job_id, running in list(self._beating.items()):
                if now >= running.deadline:
                    running.end(cancelled=False)
                elif running.progress is not None and now - running.progress_at >= (
                    PROGRESS_EVERY_S
                ):
                    self._write_progress(job_id, running)
            if now < next_renewal:
                continue
            next_renewal = now + every_ms / 2000
            now_ms = int(time.time() * 1000)
            for job_id, running in list(self._beating.items()):
                current = self.table.get(job_id)
                if current is None or current.state != ACTIVE or current.attempt != running.attempt:
                    continue
                if (current.lease_until_ms or 0) - now_ms <= lease_ms - every_ms:
                    self._write_soon(current._replace(lease_until_ms=now_ms + lease_ms))

    async def _failed(
        self,
        held: Held,
        status: JobStatus | None,
        error: BaseException,
        stalled: bool,
        note: str | None = None,
    ) -> None:
        """Attempt `held.attempt` (or, stalled, the status's) failed: retry or dead-letter."""
        attempt = status.attempt if stalled and status is not None else held.attempt
        if attempt >= self._max_attempts(held):
            await self._dead(held, status, error, attempt)
            return
        now_ms = int(time.time() * 1000)
        delay = self.queue.backoff.delay_ms(attempt, random.uniform(-1, 1))  # noqa: S311
        due = now_ms + delay
        first = _first_failure(status, now_ms)
        headers = failure_headers(
            message_headers(held.msg),
            self._origin(held),
            Failure(None, STAGE, error, attempt, first, now_ms),
        )
        headers = [(n, v) for n, v in headers if n not in (ATTEMPT, DUE)]
        headers += [(ATTEMPT, str(attempt + 1).encode()), (DUE, str(due).encode())]
        await self._send(held.tp[0], [(held.msg.key(), held.msg.value(), headers)], held.tp[1])
        failed = self._status(
            held,
            status,
            FAILED,
            now_ms,
            attempt=attempt,
            error=cut(f"{type(error).__name__}: {error}"),
            due_ms=due,
            lease_until_ms=None,
            note="lease expired" if stalled else note,
        )
        await self._write(failed)
        self.metrics.retried.labels(self.queue.name).inc()
        # The ordering key stays with the job until its retry is finished.
        self._settled(held, key_done=False)

    async def _dead(
        self,
        held: Held,
        status: JobStatus | None,
        error: BaseException,
        attempt: int | None = None,
    ) -> None:
        """No more attempts: the record to the DLQ with the failure headers, then DEAD."""
        attempt = attempt or held.attempt
        now_ms = int(time.time() * 1000)
        headers = failure_headers(
            message_headers(held.msg),
            self._origin(held),
            Failure(None, STAGE, error, attempt, _first_failure(status, now_ms), now_ms),
        )
        await self._send(self.topics.dlq, [(held.msg.key(), held.msg.value(), headers)])
        dead = self._status(
            held,
            status,
            DEAD,
            attempt=attempt,
            error=cut(f"{type(error).__name__}: {error}"),
            lease_until_ms=None,
            due_ms=None,
        )
        await self._write(dead)
        self.metrics.dead.labels(self.queue.name).inc()
        self._settled(held, key_done=True)

    async def _dead_letter_raw(self, msg: Message, error: BaseException) -> None:
        """A record that holds no job this worker can read: to the DLQ as it is."""
        now_ms = int(time.time() * 1000)
        tp = (msg.topic() or "", msg.partition() or 0)
        own = Origin(tp[0], tp[1], msg.offset() or 0, msg.timestamp()[1])
        headers = failure_headers(
            message_headers(msg), own, Failure(None, STAGE, error, 1, now_ms, now_ms)
        )
        await self._send(self.topics.dlq, [(msg.key(), msg.value(), headers)])
        self.metrics.dead.labels(self.queue.name).inc()
        offsets = self._offsets.get(tp)
        if offsets is not None:
            offsets.finish(msg.offset() or 0)

    def _origin(self, held: Held) -> Origin:
        msg = held.msg
        own = Origin(held.tp[0], held.tp[1], msg.offset() or 0, msg.timestamp()[1])
        return origin_of(header_map(message_headers(msg)), own)

    # -- statuses and records written ----------------------------------------------------

    def _status(
        self,
        held: Held,
        status: JobStatus | None,
        state: str,
        at_ms: int | None = None,
        **changes: Any,
    ) -> JobStatus:
        now_ms = at_ms if at_ms is not None else int(time.time() * 1000)
        if status is None:
            job = held.job
            status = JobStatus(
                id=held.id,
                queue=self.queue.name,
                state=state,
                attempt=held.attempt,
                max_attempts=self._max_attempts(held),
                priority=self.priority_of.get(held.tp[0], 0),
                topic=held.tp[0],
                partition=held.tp[1],
                submitted_at_ms=int(job.get("submitted_at") or now_ms),
                updated_at_ms=now_ms,
                ordering_key=held.key,
                tags=tuple(job.get("tags") or ()),
            )
        changes.setdefault("attempt", held.attempt)
        changes.setdefault("worker", self.worker_id)
        return status.moved(state, now_ms, **changes)

    def _write_soon(
        self, status: JobStatus, then: Callable[[], None] | None = None
    ) -> asyncio.Future[None]:
        """Record `status` now and write it with the next batch; the future resolves (and
        `then` is called) once Kafka confirmed it (a later write of the job is in the
        same batch or a later one)."""
        value = status.to_bytes() if status.finished else None
        self.table.put(status, value=value)
        return self._statuses.write(status, value, then)

    def _spawn_write(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("job status not written", queue=self.queue.name, error=repr(error))

    async def _write(self, status: JobStatus) -> None:
        """Record `status` now and return once Kafka confirmed it."""
        await self._write_soon(status)

    async def _send(
        self,
        topic: str,
        records: list[tuple[bytes | None, bytes | None, Any]],
        partition: int | None = None,
    ) -> None:
        """Produce and wait for Kafka's confirmation, again and again while it is away."""
        assert self._producer is not None
        delay = 0.5
        while True:
            try:
                await self._producer.send_batch(topic, records, partition)
                return
            except BrokerUnavailable as exc:
                log.warning("job record not confirmed; again", topic=topic, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- flow, commits and rebalances ------------------------------------------------------

    def _holding(self) -> bool:
        """Whether the loop reads no more for now: a queue of one priority with
        `max_ready` jobs ready, for at most `HOLD_LIMIT_S` (after that it is paused and
        reads on)."""
        if len(self._ready) != 1 or len(self._ready[0]) < self.settings.max_ready:
            self._hold_since = None
            return False
        now = time.monotonic()
        if self._hold_since is None:
            self._hold_since = now
        return now - self._hold_since < HOLD_LIMIT_S

    def _flow(self) -> None:
        """Pause a priority that has `max_ready` jobs ready until half of them started,
        so that the records of the others are not read behind its (a paused partition's
        records read ahead are dropped and fetched again after it is resumed). A queue
        of one priority stops reading instead (`_holding`), and is paused only when that
        went on for too long."""
        consumer = self._consumer
        assert consumer is not None
        high = self.settings.max_ready
        holding = len(self._ready) == 1 and self._holding()
        for priority, jobs in enumerate(self._ready):
            paused = priority in self._paused
            if not paused and len(jobs) >= high and not holding:
                self._set_paused(consumer, priority, True)
            elif paused and len(jobs) <= high // 2:
                self._set_paused(consumer, priority, False)

    def _set_paused(self, consumer: Consumer, priority: int, pause: bool) -> None:
        topic = self.topics.priority(priority)
        parts = [TopicPartition(t, p) for t, p in self._assigned if t == topic]
        if pause:
            self._paused.add(priority)
            if parts:
                consumer.pause(parts)
        else:
            self._paused.discard(priority)
            if parts:
                consumer.resume(parts)

    def _positions(self, tps: Iterable[TP] | None) -> list[TopicPartition]:
        chosen = (
            self._offsets
            if tps is None
            else {tp: self._offsets[tp] for tp in tps if tp in self._offsets}
        )
        out = []
        for (topic, partition), offsets in chosen.items():
            position = offsets.position()
            if position is not None:
                out.append(TopicPartition(topic, partition, position))
        return out

    def _commit(self, tps: Iterable[TP] | None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        positions = self._positions(tps)
        if positions:
            with contextlib.suppress(Exception):
                consumer.commit(offsets=positions, asynchronous=False)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        log.info("partitions assigned", queue=self.queue.name, partitions=len(parts))
        consumer.assign(parts)
        # A new set, not a change of the one the loop may be going through right now
        # (this runs in the thread of a read).
        self._assigned = self._assigned | {(tp.topic, tp.partition) for tp in parts}
        topic = self.topics.priority(0)
        try:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            partitions = len(meta.partitions)
        except Exception:  # the share is an estimate until the next assignment
            partitions = self.queue.partitions or self.kafka.partitions
        self.limits.share({p for _, p in self._assigned}, partitions)
        self._rebalancing = False
        # The consumer's pause state of a partition outlives its revocation: set it here
        # from what this loop wants (a priority resumed while the partition was away must
        # not come back paused, or its jobs are never read again).
        paused = [tp for tp in parts if self.priority_of.get(tp.topic, -1) in self._paused]
        resumed = [tp for tp in parts if self.priority_of.get(tp.topic, -1) not in self._paused]
        if resumed:
            consumer.resume(resumed)
        if paused:
            consumer.pause(paused)
        self._new_partitions = True

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in parts}
        loop = self._loop
        if loop is not None and not loop.is_closed():
            wait = self.queue.timeout_s + 30
            asyncio.run_coroutine_threadsafe(self._forget(revoked), loop).result(wait)
        self._commit(revoked)
        # New ones, not changes of those the loop (or a commit) may be going through.
        self._offsets = {tp: o for tp, o in self._offsets.items() if tp not in revoked}
        self._assigned = self._assigned - revoked

    async def _forget(self, revoked: set[TP]) -> None:
        """Drop what was read of revoked partitions and not started: their next owner reads it.

        With a queue-wide concurrency cap, nothing starts until the next assignment and
        the attempts running here end first: the slots they hold move with the partitions.
        """
        if self.queue.max_concurrency is not None:
            self._rebalancing = True
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
        for priority, jobs in enumerate(self._ready):
            kept = deque(h for h in jobs if h.tp not in revoked)
            for held in jobs:
                if held.tp in revoked and self._claimed.get(held.id) is held:
                    del self._claimed[held.id]
            self._ready[priority] = kept
        self._held = [entry for entry in self._held if entry[2].tp not in revoked]
        heapq.heapify(self._held)
        for key, waiting in list(self._key_waiting.items()):
            kept_keys = deque(h for h in waiting if h.tp not in revoked)
            if kept_keys:
                self._key_waiting[key] = kept_keys
            else:
                del self._key_waiting[key]
        for job_id, later in list(self._behind.items()):
            self._behind[job_id] = [h for h in later if h.tp not in revoked]
        for key in [k for k, owner in self._keys.items() if owner.tp in revoked]:
            del self._keys[key]

    # -- what the loop shows -------------------------------------------------------------

    def _due_count(self) -> int:
        return sum(len(jobs) for jobs in self._ready)

    def _gauges(self) -> None:
        if self._started_n:
            self._started_total.inc(self._started_n)
            self._started_n = 0
        if self._completed_n:
            self._completed_total.inc(self._completed_n)
            self._completed_n = 0
        name = self.queue.name
        self.metrics.ready.labels(name).set(self._due_count())
        self.metrics.scheduled.labels(name).set(len(self._held))
        self.metrics.in_flight.labels(name).set(self._busy)


def _payload(held: Held) -> Any:
    """The job's payload as JSON; as the text it is when that is not JSON (a record from
    another producer: the HTTP worker decides)."""
    text = held.job.get("payload") or "null"
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _first_failure(status: JobStatus | None, now_ms: int) -> int:
    if status is not None:
        for entry in status.history:
            if entry.get("state") == FAILED:
                return int(entry.get("at_ms") or now_ms)
    return now_ms
