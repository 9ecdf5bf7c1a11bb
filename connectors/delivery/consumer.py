"""Delivery of a destination topic to a webhook: the consumer loop and its rebalances.

One consumer per destination reads its topic and its retry tiers
(`sluice.dest.<d>.retry.<tier>`). Each partition of each of them is a lane
(`core/due.py`): records of a lane are handled in order by its task (`lanes.py`), lanes
run side by side, so a slow or failing record holds up only its own partition. A record
is delivered, or moved to the tier its failure count calls for (with its due time in a
header), or dead-lettered (`routing.py`); only once that is done (confirmed by Kafka) is
its offset committed, so a crash redelivers and never drops. A tier lane waits for the
due time of its head record with that partition paused; the other partitions go on.
After a rebalance a lane starts from the committed offsets and checks the due time again.

This module runs the poll loop: records to their lanes, partitions paused and resumed
as the lanes want, done offsets committed, and the rebalance callbacks. With
`retry.preserve_order`, the keys of records waiting in a tier are parked
(`ordering.py`), and an assigned partition's parked state is read before its records
are handled (`restore.py`).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from connectors.delivery.lanes import LaneWork
from connectors.delivery.metrics import DeliveryMetrics
from connectors.delivery.ordering import Ordering
from connectors.delivery.pacing import Sender
from connectors.delivery.parking import ParkedKeys
from connectors.delivery.restore import Restores
from connectors.delivery.routing import Routing
from connectors.retry import retry_due_rule
from connectors.webhook import WebhookClient, webhook_session
from core.config import RetryPolicy, WebhookConfig
from core.due import TP, DueLanes, Lane
from core.producer import EventProducer
from core.settings import DeliverySettings, KafkaSettings
from core.topics import DestinationTopics
from core.watchdog import StallWatchdog
from schemas.codec import AvroCodec

log = structlog.get_logger("sluice.delivery")
# A lane holding this many records has its partition paused until it is down to half.
LANE_HIGH_WATER = 2000


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
        self.kafka = kafka
        self._stopping = asyncio.Event()
        self.sender = Sender(destination, cfg, metrics, self._stopping)
        self._tier_of = {topics.retry(i): i for i in range(len(topics.tiers))}
        rule = retry_due_rule(self.policy)
        self._lanes: DueLanes[Message] = DueLanes(
            dict.fromkeys(self._tier_of, rule), LANE_HIGH_WATER
        )
        self._routing = Routing(destination, topics, self.policy, codec, metrics)
        self.watchdog = StallWatchdog(f"delivery of {destination}", self.settings.stall_after_s)
        self._work = LaneWork(
            destination,
            topics,
            cfg,
            metrics,
            self._lanes,
            self._routing,
            self.sender,
            self.watchdog,
            self._tier_of,
        )
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
        # Order-preserving mode only, made when the loop runs (they write to Kafka).
        self._ordering: Ordering | None = None
        self._restores: Restores | None = None
        self._partitions_total = 0
        self._mine: set[int] = set()
        self._assigned: set[TP] = set()
        self._crashed: BaseException | None = None
        self._polled = time.monotonic()

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
        self._producer = self._routing.producer = EventProducer(self.kafka, timeout_s=30.0)
        if self.policy.preserve_order:
            parking = ParkedKeys(self.topics.parked, self.kafka, self._producer)
            self._ordering = self._work.ordering = Ordering(
                parking,
                self.destination,
                self.topics,
                self.settings,
                self.metrics,
                self._routing,
                self.sender,
                self.watchdog,
                self._lane_ended,
            )
            self._restores = Restores(
                parking,
                self._ordering,
                loop,
                self.destination,
                self.metrics,
                self.watchdog,
                self._lane_ended,
            )
        topics = [self.topics.main, *self._tier_of]
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_commit = 0.0
        try:
            async with webhook_session(self.settings) as session:
                self.sender.client = WebhookClient(self.cfg, session, self.settings)
                while not self._stopping.is_set():
                    self._polled = time.monotonic()
                    self._apply_flow()
                    msgs = await loop.run_in_executor(None, self._consumer.consume, 500, 0.1)
                    for msg in msgs:
                        if _ok(msg) and not self._set_aside(msg):
                            self._lane_of(msg).pending.append(msg)
                    self._lanes.wake_ready()
                    if time.monotonic() - last_commit >= 0.5:
                        self.watchdog.lag(self._waiting())
                        await loop.run_in_executor(None, self._commit_done)
                        last_commit = time.monotonic()
                # Releases of held records stop at a record boundary too, before the HTTP
                # session closes under a request in flight.
                releases = self._ordering.halt() if self._ordering is not None else []
                await self._stop_lanes(list(self._lanes), releases)
                await loop.run_in_executor(None, self._commit_done)
        finally:
            if self._restores is not None:
                await self._restores.close()
            self.watchdog.lag(0)
            await loop.run_in_executor(None, self._consumer.close)
            await loop.run_in_executor(None, self._producer.close)
        if self._crashed is not None:
            raise RuntimeError(f"delivery of {self.destination} failed") from self._crashed

    def stop(self) -> None:
        """Finish the records in flight, commit what is done, stop."""
        self._stopping.set()
        if self._ordering is not None:
            self._ordering.halt()  # no release takes another record from now on
            self._ordering.room.set()
        self._lanes.stop_all()

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
        if self.sender.breaker.state == "open":
            return 0
        return self._lanes.ready_count()

    def _set_aside(self, msg: Message) -> bool:
        """True for a record of a partition being restored: it is read again afterwards."""
        return self._restores is not None and self._restores.set_aside(msg)

    def _lane_of(self, msg: Message) -> Lane[Message]:
        tp = (msg.topic() or "", msg.partition() or 0)
        lane = self._lanes.get(tp)
        if lane is None:
            lane = self._lanes.add(*tp)
            lane.task = asyncio.create_task(self._work.run(lane))
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
        also: set[TP] = set()
        if (restores := self._restores) is not None:
            restoring = restores.restoring()
            also = {tp for tp in self._assigned if tp[1] in restoring}
            # Records fetched before the partition was paused for its restore: again.
            also |= restores.rewind(self._consumer, restoring)
        flow = self._lanes.flow(also)
        if flow.pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in flow.pause])
        if flow.resume:
            self._consumer.resume([TopicPartition(t, p) for t, p in flow.resume])
        self.metrics.paused.labels(self.destination).set(len(self._lanes.paused))

    def _commit_done(self) -> None:
        # A copy: lanes on the event loop's thread mark records done meanwhile.
        todo = self._lanes.uncommitted()
        if not todo:
            return
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=False
        )
        self._lanes.mark_committed(todo)

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
        if self._ordering is not None:
            self._ordering.assigned({tp.partition for tp in parts})
        if self._restores is None or self._loop is None:
            return

        def pause(new: list[int]) -> None:
            # The parked state is read beside the poll loop, however long its changelog,
            # with the partition paused in every topic until it is in: never inside this
            # callback, where a long read would hold up polling and the group.
            paused = [tp for tp in parts if tp.partition in new]
            consumer.pause(paused)
            self._lanes.mark_paused((tp.topic, tp.partition) for tp in paused)

        self._restores.begin({tp.partition for tp in parts}, pause)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in parts}
        if self._loop is not None and not self._loop.is_closed():
            lanes = [lane for lane in self._lanes if lane.tp in revoked]
            numbers = {tp.partition for tp in parts}
            stopped = asyncio.run_coroutine_threadsafe(self._revoke(lanes, numbers), self._loop)
            stopped.result(timeout=self.cfg.timeout_s + 40)
        self._commit_done()
        self._lanes.revoked(revoked)
        self._mine -= {tp.partition for tp in parts if tp.topic == self.topics.main}
        self._assigned -= revoked
        if self._restores is not None:
            self._restores.revoked(revoked)
        self._share(consumer)

    async def _revoke(self, lanes: list[Lane[Message]], partitions: set[int]) -> None:
        # Releases stop at a record boundary too; then the partition's state is dropped
        # (its next owner restores it from the changelog).
        ordering = self._ordering
        releases = ordering.revoking(partitions) if ordering is not None else []
        await self._stop_lanes(lanes, releases)
        if ordering is not None:
            ordering.drop(partitions)

    async def _stop_lanes(
        self, lanes: list[Lane[Message]], releases: list[asyncio.Task[None]] | None = None
    ) -> None:
        """Let each lane finish the record in hand (bounded), then drop what it still holds."""
        for lane in lanes:
            lane.stop()
        if self._ordering is not None:
            self._ordering.room.set()  # a lane waiting for room to hold a record sees it stops
        tasks = [lane.task for lane in lanes if lane.task is not None] + (releases or [])
        _, late = await asyncio.wait(tasks, timeout=self.cfg.timeout_s + 30) if tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in lanes:
            self._lanes.remove(lane.tp)

    def _share(self, consumer: Consumer) -> None:
        pacer = self.sender.pacer
        if pacer is None:
            return
        # The destination's rate is shared by partitions: this process sends its part.
        if not self._partitions_total:
            meta = consumer.list_topics(self.topics.main, timeout=10)
            self._partitions_total = len(meta.topics[self.topics.main].partitions)
        if self._mine:
            pacer.share = len(self._mine) / self._partitions_total


def _ok(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume error", error=err.str())
    return False
