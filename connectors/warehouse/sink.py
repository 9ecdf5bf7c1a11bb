"""The warehouse sink: consume destination topics, insert exactly-once batches, commit.

Exactly-once rows come from deterministic batches. Before inserting offsets a..b of a
partition, the sink commits offset a with the metadata `pending:b`; then it inserts
with the token `topic:partition:a:b`; then it commits b+1. A sink that crashes in
between finds `pending:b` on restart, rebuilds exactly a..b, and inserts it again with
the same token, which ClickHouse's insert deduplication turns into a no-op.

Failures are told apart by what they say about the next try. A transient one (the
warehouse unreachable, overloaded, out of memory or parts) is retried in place with
backoff; meanwhile the partitions are paused and the consumer keeps polling, so an
outage longer than `max.poll.interval.ms` neither drops the sink from its group nor
loses the batch. A batch the warehouse refuses for good is halved until the records
behind the refusal are found (`loading`): those go to the destination's DLQ with the
engine's error (`dead_letters`), the rest loads, and the batch's offsets are committed
only after the DLQ confirmed its writes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from connectors.errors import DestinationUnavailable
from connectors.warehouse.buffer import PartitionBuffer, replayed_from
from connectors.warehouse.clickhouse import Warehouse
from connectors.warehouse.consumer import records_behind, sink_consumer
from connectors.warehouse.copies import RecentIds, recent_event_ids
from connectors.warehouse.dead_letters import DeadLetters
from connectors.warehouse.loader import Batch
from connectors.warehouse.loading import BatchLoading
from connectors.warehouse.metrics import SinkMetrics
from connectors.warehouse.refusals import fatal
from connectors.warehouse.targets import SinkTarget
from core.errors import SchemaError, SluiceError
from core.ranges import merge_ranges
from core.settings import KafkaSettings, WarehouseSettings
from core.watchdog import StallWatchdog
from schemas.codec import AvroCodec

# Fencings of the sink's static member taken for a coordinator's failover and joined again;
# more within the window is another sink with the same instance id, and the loop ends.
MAX_FENCED = 3
FENCED_WINDOW_S = 300.0

log = structlog.get_logger("sluice.sink")

PENDING = "pending:"
# How often the sink measures its lag (records waiting) for the stall watchdog.
LAG_EVERY_S = 5.0


class WarehouseSink:
    """Consumes destination topics into the warehouse until `stop()`."""

    def __init__(
        self,
        warehouse: Warehouse,
        targets: list[SinkTarget],
        kafka: KafkaSettings,
        settings: WarehouseSettings,
        codec: AvroCodec,
        metrics: SinkMetrics | None = None,
        watchdog: StallWatchdog | None = None,
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        self.warehouse = warehouse
        self.targets = {t.topic: t for t in targets}
        self.settings = settings
        self.codec = codec
        self.metrics = metrics or SinkMetrics()
        self.watchdog = watchdog or StallWatchdog("sink", settings.stall_after_s)
        self._on_death = on_death
        self.loading = BatchLoading(
            warehouse, self.metrics, lambda: [t.table for t in self.targets.values()]
        )
        self._stop = threading.Event()
        self._new_targets: list[SinkTarget] | None = None
        self._buffers: dict[tuple[str, int], PartitionBuffer] = {}
        self._dead_letters = DeadLetters(kafka, self.metrics)
        # Records fetched while the sink waited out a failure: added once it is over.
        self._held: list[tuple[int, Message]] = []
        self._epoch = 0
        self._paused = False
        self._resolve_at = 0.0
        self._lag_at = 0.0
        self._consumer = sink_consumer(kafka, settings)
        self.kafka = kafka
        self._fenced: list[float] = []
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Create the tables and consume in a background thread."""
        for target in self.targets.values():
            self.loading.prepare(target.table)
        if self.targets:
            self._consumer.subscribe(
                list(self.targets), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
        self.thread = threading.Thread(target=self._run, name="warehouse-sink", daemon=True)
        self.thread.start()

    def update_targets(self, targets: list[SinkTarget]) -> None:
        """Consume these targets from now on (a live config change; any thread)."""
        self._new_targets = targets

    def _retarget(self) -> None:
        targets, self._new_targets = self._new_targets or [], None
        new: dict[str, SinkTarget] = {}
        for target in targets:
            try:
                self.loading.prepare(target.table)
            except DestinationUnavailable as exc:
                # Tried again on a later turn of the loop; the old targets load meanwhile.
                log.warning("new sink targets wait for the warehouse", error=str(exc))
                self._new_targets = targets
                self._stop.wait(2.0)
                return
            except SluiceError as exc:
                # A destination whose table cannot exist (an invalid name): reported,
                # left out, and the others still switch.
                log.error("destination left out", destination=target.destination, error=str(exc))
                continue
            new[target.topic] = target
        if new == self.targets:
            return
        # Open batches are flushed before the switch so nothing is dropped.
        self._flush_due(force=True)
        self.targets = new
        if new:
            self._consumer.subscribe(
                list(new), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
        else:
            self._consumer.unsubscribe()
        log.info("sink targets changed", topics=list(new))

    def stop(self, timeout: float = 30.0) -> None:
        """Flush open batches, commit, leave the group."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._epoch += 1
        self.metrics.rebalances.labels("assigned").inc(len(partitions))
        committed = consumer.committed(partitions, timeout=30)
        fresh: list[PartitionBuffer] = []
        for tp in committed:
            buf = PartitionBuffer(tp.topic, tp.partition, self._epoch)
            buf.start = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            meta = tp.metadata or ""
            if meta.startswith(PENDING):
                buf.pending_end = int(meta.removeprefix(PENDING))
                log.info(
                    "resuming a pending batch",
                    topic=tp.topic,
                    partition=tp.partition,
                    start=tp.offset,
                    end=buf.pending_end,
                )
            self._buffers[(tp.topic, tp.partition)] = buf
            fresh.append(buf)
        try:
            self._read_loaded(fresh)
        except DestinationUnavailable as exc:
            # Read again once the warehouse answers (`_resolve`); until then the
            # partitions' records are not taken (paused, and read again from `start`).
            log.warning("loaded offsets unreadable", error=str(exc))
            for buf in fresh:
                buf.loaded = None

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Uncommitted rows are simply dropped: the next owner reads them again from the
        # committed offset, and a pending marker makes it rebuild the same batch.
        self.metrics.rebalances.labels("revoked").inc(len(partitions))
        for tp in partitions:
            self._buffers.pop((tp.topic, tp.partition), None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._turn()
                except KafkaException as exc:
                    if not self._rejoin_after(exc):
                        raise
            self._flush_due(force=True)
        except Exception as exc:
            reason = f"warehouse sink loop died: {type(exc).__name__}: {exc}"
            log.exception("sink stopped by an error", reason=reason)
            self.watchdog.fail(reason)
            if self._on_death is not None:
                self._on_death(reason)
        finally:
            self._consumer.close()

    def _rejoin_after(self, exc: KafkaException) -> bool:
        """A fenced static member joins the group again with a new consumer, dropping what
        it had not committed (the pending marker rebuilds the batch).

        Fencings come without a second sink: after a session timeout while a broker failed
        over, or while the group's coordinator moved, librdkafka's static member can be
        fenced by its own earlier registration. True when it rejoined; False for another
        error, or for fencings again and again (more than `MAX_FENCED` within
        `FENCED_WINDOW_S`: another member with the same instance id keeps taking the place,
        and the loop ends with the reason).
        """
        # librdkafka's only fatal consumer error is a static member's fencing (its text may
        # say only "Commit failed: Local: Fatal error").
        if not fatal(exc):
            return False
        err = exc.args[0]
        now = time.monotonic()
        self._fenced = [t for t in self._fenced if now - t < FENCED_WINDOW_S] + [now]
        if len(self._fenced) > MAX_FENCED:
            return False
        log.warning("sink consumer fenced; joining the group again", error=err.str())
        self.metrics.rebalances.labels("fenced").inc()
        with contextlib.suppress(Exception):
            self._consumer.close()
        # Uncommitted rows are dropped as on a revoke: the pending marker rebuilds the batch.
        self._buffers.clear()
        self._held = []
        self._paused = False
        self._stop.wait(1.0)
        self._consumer = sink_consumer(self.kafka, self.settings)
        if self.targets:
            self._consumer.subscribe(
                list(self.targets), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
        return True

    def _turn(self) -> None:
        """One turn of the loop: targets, failures, a fetch, the flushes that are due."""
        if self._new_targets is not None:
            self._retarget()
        if not self.targets:
            self.watchdog.lag(0)
            self._stop.wait(0.2)
            return
        self._resolve()
        if self._held:
            batch, self._held = self._held, []
        else:
            messages = self._consumer.consume(2000, timeout=0.2)
            batch = [(self._epoch, msg) for msg in messages]
        for epoch, msg in batch:
            self._add(msg, epoch)
        self._flush_due(force=False)
        self._measure_lag()

    def _add(self, msg: Message, epoch: int) -> None:
        err = msg.error()
        if err is not None:
            if fatal(KafkaException(err)):
                # Fenced by a newer member with the same instance id, say: this consumer
                # can never commit again, so the loop must end (and the process with it).
                raise KafkaException(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error", error=err.str())
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        if topic is None or partition is None or offset is None:
            return
        buf = self._buffers.get((topic, partition))
        if buf is None or buf.loaded is None or epoch < buf.epoch:
            # Not ours, not readable yet, or fetched before the partition came back.
            return
        if buf.last >= 0 and offset <= buf.last:
            return
        if buf.first < 0:
            buf.first = offset
            buf.opened = time.monotonic()
        buf.last = offset
        destination = self.targets[topic].destination
        if (buf.loaded and buf.is_loaded(offset)) or self._copy_of_loaded(msg):
            # A replay or a second delivery of offsets that are loaded already.
            self.metrics.deduplicated.labels(destination).inc()
        else:
            try:
                event = self.codec.decode(msg.value() or b"")
            except SchemaError as exc:
                # The processor only routes records that decoded; a foreign writer's record
                # goes to the destination's DLQ with the reason before the batch commits.
                self.metrics.errors.labels(destination, "SchemaError").inc()
                buf.poison.append((msg, exc))
            else:
                if not buf.take(event, msg):
                    # A copy of an event loaded lately: processed again, or sent again.
                    self.metrics.deduplicated.labels(destination).inc()
        if buf.pending_end is not None and offset >= buf.pending_end:
            self._flush(buf)

    def _copy_of_loaded(self, msg: Message) -> bool:
        """Whether `msg` is a `sluice replay` copy of a record this sink has loaded."""
        origin = replayed_from(msg)
        if origin is None:
            return False
        topic, partition, offset = origin
        buf = self._buffers.get((topic, partition))
        return buf is not None and buf.is_loaded(offset)

    def _resolve(self) -> None:
        """Read the loaded offsets of partitions assigned while the warehouse did not answer."""
        waiting = [b for b in self._buffers.values() if b.loaded is None]
        if not waiting:
            return
        self._consumer.pause([TopicPartition(b.topic, b.partition) for b in waiting])
        if time.monotonic() < self._resolve_at:
            return
        try:
            self._read_loaded(waiting)
        except DestinationUnavailable as exc:
            log.warning("loaded offsets still unreadable", error=str(exc))
            self._resolve_at = time.monotonic() + 2.0
            return
        for buf in waiting:
            tp = TopicPartition(buf.topic, buf.partition, buf.start)
            self._consumer.seek(tp)
            if not self._paused:
                self._consumer.resume([tp])

    def _read_loaded(self, buffers: list[PartitionBuffer]) -> None:
        """What the warehouse holds of these partitions: offset ranges, recent events.

        Nothing is set unless every read answered (the buffers stay unresolved).
        """
        window = self.settings.copy_window
        ranges = {
            (b.topic, b.partition): self.warehouse.loaded_ranges(b.topic, b.partition)
            for b in buffers
        }
        recent: dict[tuple[str, int], list[str]] = {}
        for topic in {b.topic for b in buffers}:
            starts = {b.partition: b.start for b in buffers if b.topic == topic}
            table = self.targets[topic].table
            for partition, keys in recent_event_ids(
                self.warehouse, table, topic, starts, window
            ).items():
                recent[(topic, partition)] = keys
        for buf in buffers:
            buf.recent = RecentIds(window, recent[(buf.topic, buf.partition)])
            buf.loaded = merge_ranges(ranges[(buf.topic, buf.partition)])

    def _flush_due(self, force: bool) -> None:
        now = time.monotonic()
        for buf in list(self._buffers.values()):
            if buf.first < 0 or buf.pending_end is not None:
                continue
            if (
                force
                or len(buf) >= self.settings.batch_rows
                or now - buf.opened >= self.settings.batch_seconds
            ):
                self._flush(buf)

    def _flush(self, buf: PartitionBuffer) -> None:
        target = self.targets[buf.topic]
        token = Batch(buf.topic, buf.partition, buf.first, buf.last, []).token
        started = time.monotonic()
        delay = 0.5
        while True:
            if self._buffers.get((buf.topic, buf.partition)) is not buf:
                # Revoked while the sink waited: the next owner loads it from the marker.
                self._resume()
                return
            try:
                self._commit(buf, buf.first, f"{PENDING}{buf.last}")
                if buf.refused is None:
                    buf.refused = self.loading.load(target, buf)
                dead = buf.poison + buf.refused
                if dead:
                    self._dead_letters.send(target, dead)
                self._commit(buf, buf.last + 1, "")
                break
            except (DestinationUnavailable, KafkaException) as exc:
                if fatal(exc):
                    raise  # a fenced consumer never commits again: the loop must end
                # Nothing is committed past the batch: keep trying, slowing only this sink,
                # and keep polling (partitions paused) so the group keeps the sink.
                self.metrics.errors.labels(target.destination, type(exc).__name__).inc()
                log.warning(
                    "flush failed; retrying",
                    table=target.table,
                    token=token,
                    error=str(exc),
                    retry_in=delay,
                )
                if not self._wait_polling(delay):
                    return
                delay = min(delay * 2, 30.0)
        self._resume()
        self.metrics.rows.labels(target.destination).inc(len(buf) - len(buf.refused or []))
        self.metrics.batches.labels(target.destination).inc()
        self.metrics.flush_seconds.labels(target.destination).observe(time.monotonic() - started)
        self.watchdog.progress()
        buf.reset()

    def _wait_polling(self, seconds: float) -> bool:
        """Wait `seconds` and stay in the group: every partition paused, the consumer polled.

        Records fetched meanwhile (there should be none) are held and added afterwards.
        False when the sink is stopping.
        """
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            assignment = self._consumer.assignment()
            if assignment:
                self._consumer.pause(assignment)
            self._paused = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for msg in self._consumer.consume(500, timeout=min(remaining, 0.5)):
                err = msg.error()
                if err is not None and fatal(KafkaException(err)):
                    raise KafkaException(err)
                self._held.append((self._epoch, msg))
            self._measure_lag()
        return False

    def _resume(self) -> None:
        """Fetch again after a failure is over (partitions still being resolved stay paused)."""
        if not self._paused:
            return
        self._paused = False
        waiting = {(b.topic, b.partition) for b in self._buffers.values() if b.loaded is None}
        parts = [
            tp for tp in self._consumer.assignment() if (tp.topic, tp.partition) not in waiting
        ]
        if parts:
            self._consumer.resume(parts)

    def _measure_lag(self) -> None:
        """Tell the watchdog how many records wait: behind the high watermarks and in batches."""
        now = time.monotonic()
        if now < self._lag_at:
            return
        self._lag_at = now + min(LAG_EVERY_S, max(0.5, self.settings.stall_after_s / 4))
        try:
            waiting = records_behind(self._consumer)
        except KafkaException as exc:
            log.warning("cannot measure the sink's lag", error=str(exc))
            return
        for buf in self._buffers.values():
            if buf.first >= 0:
                waiting += buf.last - buf.first + 1
        self.watchdog.lag(waiting)

    def _commit(self, buf: PartitionBuffer, offset: int, metadata: str) -> None:
        # Synchronous: the next step (insert, or the next batch) must not run ahead of it.
        tp = TopicPartition(buf.topic, buf.partition, offset, metadata=metadata)
        self._consumer.commit(offsets=[tp], asynchronous=False)
