"""Delivery of a destination topic to a webhook, with retries through delay topics.

One consumer per destination reads its topic and its retry tiers
(`sluice.dest.<d>.retry.<tier>`). Each partition of each of them is a lane: records of
a lane are handled in order, lanes run side by side, so a slow or failing record holds
up only its own partition. A record is delivered, or moved to the tier its failure
count calls for (with its due time in a header), or dead-lettered; only once that is
done (confirmed by Kafka) is its offset committed, so a crash redelivers and never
drops. A tier lane waits for the due time of its head record with that partition
paused; the other partitions go on. After a rebalance a lane starts from the committed
offsets and checks the due time again.

With `retry.preserve_order`, the keys of records waiting in a tier are parked
(`connectors/parking.py`): later records of such a key wait behind it and go out after
it, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from connectors.errors import DeliveryRejected, DestinationUnavailable
from connectors.parking import Held, ParkedKeys, Restored
from connectors.retry import plan_retry, retry_due_ms
from connectors.webhook import CircuitBreaker, Pacer, WebhookClient, webhook_session
from core.config import RetryPolicy, WebhookConfig
from core.errors import BrokerUnavailable, SchemaError
from core.headers import (
    RETRY_REF,
    Failure,
    Origin,
    attempts_so_far,
    failure_headers,
    header_map,
    int_header,
    message_headers,
    origin_of,
)
from core.kafka import Record
from core.producer import EventProducer
from core.settings import DeliverySettings, KafkaSettings
from core.topics import DestinationTopics
from core.watchdog import StallWatchdog
from schemas.codec import AvroCodec

log = structlog.get_logger("sluice.delivery")
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# A lane holding this many records has its partition paused until it is down to half.
LANE_HIGH_WATER = 2000
# Keys released at once (each sends its held records one after the other): a restore that
# brings thousands of keys to release must not open thousands of requests at once.
MAX_RELEASES = 64
RESTORE_THREADS = 4
T = TypeVar("T")


class DeliveryMetrics:
    """Requests and events by outcome, retries, dead letters, lateness, parked keys."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_webhook_requests_total",
            "Webhook requests by outcome (delivered, retriable, fatal).",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.events = Counter(
            "sluice_webhook_events_total",
            "Events by outcome: delivered, retried (to a tier), dead_lettered, held (behind a"
            " parked key), stale (a retry copy whose record was resolved already).",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.breaker = Gauge(
            "sluice_webhook_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["destination"],
            registry=self.registry,
        )
        self.retries = Counter(
            "sluice_retry_records_total",
            "Records sent to a retry tier.",
            ["destination", "tier"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "sluice_dlq_records_total",
            "Records written to the destination's DLQ.",
            ["destination", "stage", "error_class"],
            registry=self.registry,
        )
        self.lateness = Histogram(
            "sluice_retry_lateness_seconds",
            "How long after its due time a retried record was attempted.",
            ["destination", "tier"],
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.parked = Gauge(
            "sluice_retry_parked_keys",
            "Keys whose later records wait behind a record in a retry tier.",
            ["destination"],
            registry=self.registry,
        )
        self.paused = Gauge(
            "sluice_delivery_paused_partitions",
            "Partitions paused: a retry waiting for its due time, a full lane, the held-records"
            " bound reached, or the parked changelog being restored.",
            ["destination"],
            registry=self.registry,
        )
        self.held = Gauge(
            "sluice_retry_held_records",
            "Records held in memory behind parked keys (at most SLUICE_DELIVERY_MAX_HELD_RECORDS,"
            " plus what a restored changelog brought).",
            ["destination"],
            registry=self.registry,
        )
        self.restoring = Gauge(
            "sluice_retry_restoring_partitions",
            "Partitions whose parked changelog is being read (paused until it is).",
            ["destination"],
            registry=self.registry,
        )
        self.since_progress = Gauge(
            "sluice_delivery_seconds_since_progress",
            "Seconds since the destination last moved a record on while records wait"
            " (0 when none wait).",
            ["destination"],
            registry=self.registry,
        )


@dataclass
class _Lane:
    """The records of one partition of one topic, handled in order by one task."""

    topic: str
    partition: int
    tier: int | None  # None: the destination topic itself
    pending: deque[Message] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: bool = False  # the head is not due yet
    blocked: bool = False  # its next record must be held, and the held-records bound is reached
    stopping: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    def wants_pause(self, paused: bool) -> bool:
        if self.waiting or self.blocked:
            return True
        # Hysteresis: a paused lane resumes at half the high-water mark.
        return len(self.pending) >= (LANE_HIGH_WATER // 2 if paused else LANE_HIGH_WATER)


class WebhookDelivery:
    """Delivers one webhook destination's topic and retry tiers until `stop()`."""

    def __init__(
        self,
        destination: str,
        topics: DestinationTopics,
        cfg: WebhookConfig,
        kafka: KafkaSettings,
        group: str,
        codec: AvroCodec,
        metrics: DeliveryMetrics,
        policy: RetryPolicy | None = None,
        settings: DeliverySettings | None = None,
    ) -> None:
        self.destination = destination
        self.settings = settings or DeliverySettings()
        self.topics = topics
        self.cfg = cfg
        self.policy = policy or RetryPolicy(tiers=topics.tiers or ("5s",))
        self.codec = codec
        self.metrics = metrics
        self.breaker = CircuitBreaker(cfg.breaker)
        self.pacer = Pacer(cfg.rate_limit.requests_per_s) if cfg.rate_limit else None
        self.kafka = kafka
        self._stopping = asyncio.Event()
        self._probe = asyncio.Lock()
        self._tier_of = {topics.retry(i): i for i in range(len(topics.tiers))}
        self._consumer = Consumer(
            kafka.client_config()
            | {
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # Partition p of the topic and of every tier goes to the same member, so
                # one process sees every record of a key (order-preserving mode).
                "partition.assignment.strategy": "range",
                # The poll loop never blocks on a destination (an open breaker, a long
                # Retry-After, a long parked changelog wait beside it with partitions paused).
                "max.poll.interval.ms": self.settings.max_poll_interval_ms,
                "session.timeout.ms": 10_000,
                # Members learn of a rebalance from heartbeats: partitions of a member that
                # left move on within half a second, so their retries are not held up.
                "heartbeat.interval.ms": 500,
            }
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: EventProducer | None = None
        self._parking: ParkedKeys | None = None
        self._client: WebhookClient | None = None
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._paused: set[tuple[str, int]] = set()
        self._done: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._releases: dict[int, set[asyncio.Task[None]]] = {}
        self._halting: set[int] = set()
        self._partitions_total = 0
        self._mine: set[int] = set()
        self._crashed: BaseException | None = None
        # Partitions whose parked changelog is being read, each with the flag that gives
        # the read up; records of them fetched meanwhile are read again from `_rewind`.
        self._restoring: dict[int, threading.Event] = {}
        self._restore_lock = threading.Lock()  # rebalance callbacks run on another thread
        self._restores: set[asyncio.Task[None]] = set()
        self._rewind: dict[tuple[str, int], int] = {}
        self._assigned: set[tuple[str, int]] = set()
        # Partitions are read side by side: a long changelog holds up only its partition.
        self._restore_pool = ThreadPoolExecutor(
            RESTORE_THREADS, thread_name_prefix=f"restore-{destination}"
        )
        self._room = asyncio.Event()  # set when held records drop below the bound
        self._releasing = asyncio.Semaphore(MAX_RELEASES)
        self._polled = time.monotonic()
        self.watchdog = StallWatchdog(f"delivery of {destination}", self.settings.stall_after_s)

    # -- the consumer loop -------------------------------------------------------------

    async def run(self) -> None:
        """Consume and deliver until stopped."""
        loop = self._loop = asyncio.get_running_loop()
        # Set here, not when built: a loop is built for every config, also when the running
        # one for the destination stays.
        for gauge in (self.metrics.parked, self.metrics.paused, self.metrics.held):
            gauge.labels(self.destination).set(0)
        self.metrics.restoring.labels(self.destination).set(0)
        self.metrics.since_progress.labels(self.destination).set_function(
            self.watchdog.seconds_stalled
        )
        self._producer = EventProducer(self.kafka, timeout_s=30.0)
        if self.policy.preserve_order:
            self._parking = ParkedKeys(self.topics.parked, self.kafka, self._producer)
        topics = [self.topics.main, *self._tier_of]
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_commit = 0.0
        try:
            async with webhook_session(self.settings) as session:
                self._client = WebhookClient(self.cfg, session, self.settings)
                while not self._stopping.is_set():
                    self._polled = time.monotonic()
                    self._apply_flow()
                    msgs = await loop.run_in_executor(None, self._consumer.consume, 500, 0.1)
                    for msg in msgs:
                        if _ok(msg) and not self._set_aside(msg):
                            self._lane_of(msg).pending.append(msg)
                    for lane in self._lanes.values():
                        if lane.pending and not lane.waiting:
                            lane.wake.set()
                    if time.monotonic() - last_commit >= 0.5:
                        self.watchdog.lag(self._waiting())
                        await loop.run_in_executor(None, self._commit_done)
                        last_commit = time.monotonic()
                await self._stop_lanes(list(self._lanes.values()))
                await loop.run_in_executor(None, self._commit_done)
        finally:
            with self._restore_lock:
                for cancelled in self._restoring.values():
                    cancelled.set()
            for task in self._restores:
                task.cancel()
            await asyncio.gather(*self._restores, return_exceptions=True)
            self._restore_pool.shutdown(wait=False, cancel_futures=True)
            self.watchdog.lag(0)
            await loop.run_in_executor(None, self._consumer.close)
            await loop.run_in_executor(None, self._producer.close)
        if self._crashed is not None:
            raise RuntimeError(f"delivery of {self.destination} failed") from self._crashed

    def stop(self) -> None:
        """Finish the records in flight, commit what is done, stop."""
        self._stopping.set()
        self._room.set()
        for lane in self._lanes.values():
            lane.stopping = True
            lane.wake.set()

    def problem(self) -> str | None:
        """Why this destination's delivery is not ready (None when it is)."""
        if self._crashed is not None:
            return f"delivery of {self.destination} failed: {self._crashed!r}"
        if problem := self.watchdog.problem():
            return problem
        # A rebalance may hold the poll loop while lanes finish their records (bounded).
        bound = self.settings.stall_after_s + self.cfg.timeout_s + 40
        if (silent := time.monotonic() - self._polled) > bound:
            return f"delivery of {self.destination}: the consumer has not polled for {silent:.0f} s"
        return None

    def _waiting(self) -> int:
        """Records this loop could move on now: the stall watchdog's lag.

        Records waiting on purpose are left out: a tier lane's head that is not due, a
        lane paused at the held-records bound, everything while the breaker is open.
        """
        if self.breaker.state == "open":
            return 0
        return sum(
            len(lane.pending) for lane in self._lanes.values() if not (lane.waiting or lane.blocked)
        )

    def _set_aside(self, msg: Message) -> bool:
        """True for a record of a partition being restored: it is read again afterwards."""
        partition = msg.partition() or 0
        if partition not in self._restoring:
            return False
        tp = (msg.topic() or "", partition)
        offset = msg.offset() or 0
        self._rewind[tp] = min(self._rewind.get(tp, offset), offset)
        return True

    def _lane_of(self, msg: Message) -> _Lane:
        tp = (msg.topic() or "", msg.partition() or 0)
        lane = self._lanes.get(tp)
        if lane is None:
            lane = self._lanes[tp] = _Lane(tp[0], tp[1], self._tier_of.get(tp[0]))
            lane.task = asyncio.create_task(self._run_lane(lane))
            lane.task.add_done_callback(self._lane_ended)
        return lane

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug, not a failed delivery: stop, and let `run` raise it. Nothing of the
            # lane was committed past what it finished.
            log.error("delivery lane failed", destination=self.destination, error=repr(error))
            self._crashed = error
            self.stop()

    def _apply_flow(self) -> None:
        want = {tp for tp, lane in self._lanes.items() if lane.wants_pause(tp in self._paused)}
        with self._restore_lock:
            restoring = set(self._restoring)
        want |= {tp for tp in self._assigned if tp[1] in restoring}
        for tp in [tp for tp in self._rewind if tp[1] not in restoring]:
            # Records fetched before the partition was paused for its restore: again.
            try:
                self._consumer.seek(TopicPartition(tp[0], tp[1], self._rewind[tp]))
            except KafkaException as exc:
                log.warning("seek failed; trying again", partition=tp, error=str(exc))
                continue
            del self._rewind[tp]
        want |= set(self._rewind)  # paused until it is read again from there
        if pause := want - self._paused:
            self._consumer.pause([TopicPartition(t, p) for t, p in pause])
        if resume := self._paused - want:
            self._consumer.resume([TopicPartition(t, p) for t, p in resume])
        self._paused = want
        self.metrics.paused.labels(self.destination).set(len(want))

    def _commit_done(self) -> None:
        # A copy first: lanes on the event loop's thread update `_done` meanwhile.
        done = self._done.copy()
        todo = {tp: o for tp, o in done.items() if self._committed.get(tp) != o}
        if not todo:
            return
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=False
        )
        self._committed.update(todo)

    # -- rebalances (called by librdkafka inside consume, on the executor thread) ----------

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        log.info("partitions assigned", destination=self.destination, partitions=len(parts))
        # librdkafka keeps a partition's pause across a rebalance that gives it back: a
        # new assignment starts unpaused, its lanes pause again if their heads are not due.
        consumer.assign(parts)
        consumer.resume(parts)
        mine = {tp.partition for tp in parts if tp.topic == self.topics.main}
        self._mine |= mine
        self._assigned |= {(tp.topic, tp.partition) for tp in parts}
        self._share(consumer)
        self._halting -= {tp.partition for tp in parts}
        if self._parking is None or self._loop is None:
            return
        # The parked state is read beside the poll loop, however long its changelog, with
        # the partition paused in every topic until it is in: never inside this callback,
        # where a long read would hold up polling and the group.
        with self._restore_lock:
            new = sorted(
                {tp.partition for tp in parts} - self._parking.partitions() - set(self._restoring)
            )
            if not new:
                return
            paused = [tp for tp in parts if tp.partition in new]
            consumer.pause(paused)
            self._paused |= {(tp.topic, tp.partition) for tp in paused}
            for partition in new:
                self._restoring[partition] = threading.Event()
        self.metrics.restoring.labels(self.destination).set(len(self._restoring))
        self._loop.call_soon_threadsafe(self._start_restores, new)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in parts}
        if self._loop is not None and not self._loop.is_closed():
            lanes = [lane for tp, lane in self._lanes.items() if tp in revoked]
            numbers = {tp.partition for tp in parts}
            stopped = asyncio.run_coroutine_threadsafe(self._revoke(lanes, numbers), self._loop)
            stopped.result(timeout=self.cfg.timeout_s + 40)
        self._commit_done()
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)
            self._paused.discard(tp)
        self._mine -= {tp.partition for tp in parts if tp.topic == self.topics.main}
        self._assigned -= revoked
        for tp in revoked:
            self._rewind.pop(tp, None)
        with self._restore_lock:
            for partition in {tp.partition for tp in parts}:
                if (cancelled := self._restoring.pop(partition, None)) is not None:
                    cancelled.set()
        self.metrics.restoring.labels(self.destination).set(len(self._restoring))
        self._share(consumer)

    async def _revoke(self, lanes: list[_Lane], partitions: set[int]) -> None:
        # Releases stop at a record boundary too; then the partition's state is dropped
        # (its next owner restores it from the changelog).
        self._halting |= partitions
        releases = [t for p in partitions for t in self._releases.pop(p, set())]
        await self._stop_lanes(lanes, releases)
        if self._parking is not None:
            for partition in partitions:
                self._parking.drop(partition)
            self._count_parked()

    # -- restoring the parked state ------------------------------------------------------

    def _start_restores(self, partitions: list[int]) -> None:
        for partition in partitions:
            task = asyncio.create_task(self._restore(partition))
            self._restores.add(task)
            task.add_done_callback(self._restores.discard)
            task.add_done_callback(self._lane_ended)

    async def _restore(self, partition: int) -> None:
        """Read a partition's parked state off the poll loop, then let it flow again."""
        parking, loop = self._parking, self._loop
        assert parking is not None
        assert loop is not None
        delay = 1.0
        while (cancelled := self._restoring.get(partition)) is not None:
            try:
                restored: Restored = await loop.run_in_executor(
                    self._restore_pool,
                    partial(parking.read, partition, cancelled, self.watchdog.progress),
                )
            except (RuntimeError, TimeoutError, KafkaException) as exc:
                log.warning(
                    "restoring parked keys failed; retrying",
                    destination=self.destination,
                    partition=partition,
                    error=str(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if restored is None or self._restoring.get(partition) is not cancelled:
                break  # revoked meanwhile (and maybe assigned again: read again)
            to_release = parking.install(partition, restored)
            with self._restore_lock:
                del self._restoring[partition]  # the next `_apply_flow` resumes it
            self.metrics.restoring.labels(self.destination).set(len(self._restoring))
            self._count_parked()
            log.info(
                "parked keys restored",
                destination=self.destination,
                partition=partition,
                keys=len(restored[0]),
            )
            if to_release:
                self._start_releases(partition, to_release)
            break

    def _count_parked(self) -> None:
        parking = self._parking
        if parking is None:
            return
        self.metrics.parked.labels(self.destination).set(len(parking))
        self.metrics.held.labels(self.destination).set(parking.held_count)
        if parking.held_count < self.settings.max_held_records:
            self._room.set()

    async def _stop_lanes(
        self, lanes: list[_Lane], releases: list[asyncio.Task[None]] | None = None
    ) -> None:
        """Let each lane finish the record in hand (bounded), then drop what it still holds."""
        for lane in lanes:
            lane.stopping = True
            lane.wake.set()
        self._room.set()  # a lane waiting for room to hold a record sees that it stops
        tasks = [lane.task for lane in lanes if lane.task is not None] + (releases or [])
        _, late = await asyncio.wait(tasks, timeout=self.cfg.timeout_s + 30) if tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in lanes:
            self._lanes.pop(lane.tp, None)

    def _share(self, consumer: Consumer) -> None:
        if self.pacer is None:
            return
        # The destination's rate is shared by partitions: this process sends its part.
        if not self._partitions_total:
            meta = consumer.list_topics(self.topics.main, timeout=10)
            self._partitions_total = len(meta.topics[self.topics.main].partitions)
        if self._mine:
            self.pacer.share = len(self._mine) / self._partitions_total

    # -- lanes ---------------------------------------------------------------------------

    async def _run_lane(self, lane: _Lane) -> None:
        size = self.cfg.batch_size if lane.tier is None else 1
        while not lane.stopping:
            if not lane.pending:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            if lane.tier is not None and not await self._until_due(lane):
                continue
            chunk = [lane.pending[i] for i in range(min(size, len(lane.pending)))]
            if lane.tier is None:
                if not await self._handle_new(lane, chunk):
                    continue  # stopping at the held-records bound: nothing of it done
            else:
                await self._handle_retry(lane, chunk[0])
            for msg in chunk:
                lane.pending.popleft()
                self._done[lane.tp] = (msg.offset() or 0) + 1
            self.watchdog.progress()

    async def _until_due(self, lane: _Lane) -> bool:
        """Wait until the head of a tier lane is due; False when the lane is stopping."""
        head = lane.pending[0]
        due_ms = retry_due_ms(header_map(message_headers(head)), _ts(head), _now_ms(), self.policy)
        wait = due_ms / 1000 - time.time()
        if wait > 0:
            lane.waiting = True
            lane.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), wait)
            lane.waiting = False
            if lane.stopping or due_ms / 1000 > time.time():
                return False
        tier = self.topics.tiers[lane.tier or 0]
        self.metrics.lateness.labels(self.destination, tier).observe(
            max(0.0, time.time() - due_ms / 1000)
        )
        return True

    async def _handle_new(self, lane: _Lane, chunk: list[Message]) -> bool:
        """Records of the destination topic: deliver, or hold behind their parked key.

        False (nothing done) when the lane stops while it waits for room to hold a record.
        """
        parking = self._parking
        if parking is not None and not await self._room_to_hold(lane, chunk):
            return False
        ready: list[tuple[Message, dict[str, Any]]] = []
        for msg in chunk:
            key = msg.key()
            if parking is not None and key is not None and parking.get(lane.partition, key):
                held = parking.hold(lane.partition, key, _held(msg, _ref(msg)))
                await self._durably(partial(parking.persist, lane.partition, key, held))
                self.metrics.events.labels(self.destination, "held").inc()
                self._count_parked()
                continue
            event = await self._decode(msg)
            if event is not None:
                ready.append((msg, event))
        if not ready:
            return True
        error = await self._attempt([event for _, event in ready])
        now = _now_ms()
        for msg, _ in ready:
            if error is None:
                continue
            key = msg.key()
            if parking is not None and key is not None and parking.get(lane.partition, key):
                # An earlier record of this key in the same request went to a tier.
                held = parking.hold(lane.partition, key, _held(msg, _ref(msg)))
                await self._durably(partial(parking.persist, lane.partition, key, held))
                continue
            origin = Origin(msg.topic() or "", lane.partition, msg.offset() or 0, _ts(msg))
            headers = message_headers(msg)
            moved = await self._failed(
                lane.partition, key, msg.value() or b"", headers, origin, error, 1, now, _ref(msg)
            )
            if moved and parking is not None and key is not None:
                await self._durably(partial(parking.park, lane.partition, key, _ref(msg), 1))
                self._count_parked()
        return True

    async def _room_to_hold(self, lane: _Lane, chunk: list[Message]) -> bool:
        """Wait while a record of `chunk` must be held and the held-records bound is reached.

        The lane's partition is paused meanwhile; records of other partitions, retries and
        releases go on, and a release makes room. False when the lane stops first.
        """
        parking = self._parking
        assert parking is not None
        bound = self.settings.max_held_records
        if parking.held_count < bound or not any(
            (key := msg.key()) is not None and parking.get(lane.partition, key) for msg in chunk
        ):
            return True
        lane.blocked = True
        try:
            while parking.held_count >= bound and not lane.stopping:
                self._room.clear()
                await self._room.wait()
        finally:
            lane.blocked = False
        return not lane.stopping

    async def _handle_retry(self, lane: _Lane, msg: Message) -> None:
        """A due record of a retry tier: try again; on to the next tier, or the DLQ."""
        headers = header_map(message_headers(msg))
        ref = headers.get(RETRY_REF)
        attempts = attempts_so_far(headers)
        key = msg.key()
        parking = self._parking
        state = parking.get(lane.partition, key) if parking and key is not None else None
        if state is not None and (state.head != ref or attempts < state.attempts):
            # A copy of a record that was resolved (or moved on) already: delivering it
            # would break the key's order.
            self.metrics.events.labels(self.destination, "stale").inc()
            return
        event = await self._decode(msg)
        if event is None:
            if state is not None and key is not None:
                await self._resolved(lane.partition, key)
            return
        error = await self._attempt([event], attempts + 1)
        own = Origin(msg.topic() or "", lane.partition, msg.offset() or 0, _ts(msg))
        if error is not None:
            first = int_header(headers, "sluice.first.failure") or _now_ms()
            moved = await self._failed(
                lane.partition,
                key,
                msg.value() or b"",
                message_headers(msg),
                origin_of(headers, own),
                error,
                attempts + 1,
                first,
                ref,
            )
            if moved:
                if state is not None and key is not None and parking is not None and ref:
                    await self._durably(
                        partial(parking.park, lane.partition, key, ref, attempts + 1)
                    )
                return
        if state is not None and key is not None:
            await self._resolved(lane.partition, key)

    async def _resolved(self, partition: int, key: bytes) -> None:
        """A parked key's head is done: release the records held behind it, in order."""
        assert self._parking is not None
        parking = self._parking
        await self._durably(partial(parking.head_resolved, partition, key))
        self._start_releases(partition, [key])

    def _start_releases(self, partition: int, keys: list[bytes]) -> None:
        tasks = self._releases.setdefault(partition, set())
        for key in keys:
            task = asyncio.create_task(self._release(partition, key))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(self._lane_ended)  # a release that fails is a bug too

    async def _release(self, partition: int, key: bytes) -> None:
        async with self._releasing:
            await self._release_key(partition, key)

    async def _release_key(self, partition: int, key: bytes) -> None:
        parking = self._parking
        assert parking is not None
        while partition not in self._halting and (held := parking.next_held(partition, key)):
            headers = header_map(held.headers)
            own = Origin(
                self.topics.main, partition, int(held.ref.split(":")[1]), held.timestamp_ms
            )
            event = await self._decode_value(key, held.value, held.headers, own)
            error = None if event is None else await self._attempt([event])
            if error is not None:
                moved = await self._failed(
                    partition,
                    key,
                    held.value,
                    held.headers,
                    origin_of(headers, own),
                    error,
                    1,
                    _now_ms(),
                    held.ref,
                )
                if moved:
                    # The held record is the key's new head: the rest waits behind it.
                    await self._durably(partial(parking.park, partition, key, held.ref, 1))
                    await self._durably(partial(parking.released, partition, key, held))
                    self._count_parked()
                    return
            await self._durably(partial(parking.released, partition, key, held))
            self._count_parked()
            self.watchdog.progress()
        if partition in self._halting:
            return  # revoked: the next owner goes on from the changelog
        await self._durably(partial(parking.freed, partition, key))
        self._count_parked()

    # -- attempts and their outcomes -----------------------------------------------------

    async def _attempt(
        self, events: list[dict[str, Any]], attempt: int = 1
    ) -> BaseException | None:
        """One request: None when delivered, else the (classified) error."""
        assert self._client is not None
        probing = await self._closed_breaker()
        if self.pacer is not None:
            await self.pacer.wait()
        try:
            await self._client.send(events, attempt)
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

    async def _failed(
        self,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        origin: Origin,
        error: BaseException,
        attempts: int,
        first_failure_ms: int,
        ref: str | None,
    ) -> bool:
        """Send a failed record to its next tier (True) or to the DLQ (False)."""
        now = _now_ms()
        failure = Failure(self.destination, "delivery", error, attempts, first_failure_ms, now)
        plan = None
        if isinstance(error, DestinationUnavailable):
            plan = plan_retry(self.policy, attempts, first_failure_ms, now, error.retry_after)
        if plan is not None:
            tier = self.topics.tiers[plan.tier]
            record: Record = (
                key,
                value,
                failure_headers(headers, origin, failure, plan, tier, ref),
            )
            await self._durably(
                partial(self._send, self.topics.retry(plan.tier), [record], partition)
            )
            self.metrics.retries.labels(self.destination, tier).inc()
            self.metrics.events.labels(self.destination, "retried").inc()
            return True
        record = (key, value, failure_headers(headers, origin, failure))
        await self._durably(partial(self._send, self.topics.dlq, [record], partition))
        self.metrics.dead_letters.labels(self.destination, "delivery", type(error).__name__).inc()
        self.metrics.events.labels(self.destination, "dead_lettered").inc()
        log.warning("dead-lettered", destination=self.destination, error=str(error))
        return False

    async def _decode(self, msg: Message) -> dict[str, Any] | None:
        own = Origin(msg.topic() or "", msg.partition() or 0, msg.offset() or 0, _ts(msg))
        return await self._decode_value(msg.key(), msg.value() or b"", message_headers(msg), own)

    async def _decode_value(
        self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], own: Origin
    ) -> dict[str, Any] | None:
        """The event, or None after dead-lettering a record that does not decode."""
        try:
            return self.codec.decode(value)
        except SchemaError as exc:
            now = _now_ms()
            origin = origin_of(header_map(headers), own)
            failure = Failure(self.destination, "decode", exc, 0, now, now)
            record: Record = (key, value, failure_headers(headers, origin, failure))
            await self._durably(partial(self._send, self.topics.dlq, [record], own.partition))
            self.metrics.dead_letters.labels(self.destination, "decode", "SchemaError").inc()
            self.metrics.events.labels(self.destination, "dead_lettered").inc()
            return None

    async def _send(self, topic: str, records: list[Record], partition: int) -> None:
        assert self._producer is not None
        await self._producer.send_batch(topic, records, partition)

    async def _durably(self, write: Callable[[], Awaitable[T]]) -> T:
        """Retry a Kafka write until it is confirmed: nothing may be committed before."""
        delay = 0.5
        while True:
            try:
                return await write()
            except BrokerUnavailable as exc:
                log.warning("write not confirmed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def _held(msg: Message, ref: str) -> Held:
    return Held(0, ref, msg.value() or b"", message_headers(msg), _ts(msg))


def _ref(msg: Message) -> str:
    return f"{msg.partition()}:{msg.offset()}"


def _ts(msg: Message) -> int:
    return int(msg.timestamp()[1])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ok(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume error", error=err.str())
    return False
