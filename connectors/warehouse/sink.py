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
behind the refusal are found: those go to the destination's DLQ with the engine's
error, the rest loads, and the batch's offsets are committed only after the DLQ
confirmed its writes. A batch's inserts are staged first and run with the raw events
table last, so a refusal never leaves the raw table with a half-loaded batch.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry, Counter, Histogram

from connectors.errors import DestinationUnavailable, WarehouseRefused
from connectors.warehouse.clickhouse import OFFSETS_TABLE, StagedInsert, Warehouse, warehouse_error
from connectors.warehouse.loader import Batch, Loader, LoadResult
from core.errors import SchemaError, SluiceError
from core.headers import REPLAY_OF, Failure, Origin, failure_headers, message_headers
from core.settings import KafkaSettings, WarehouseSettings
from core.watchdog import StallWatchdog
from schemas.codec import AvroCodec

log = structlog.get_logger("sluice.sink")

PENDING = "pending:"
# How often the sink measures its lag (records waiting) for the stall watchdog.
LAG_EVERY_S = 5.0
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SinkMetrics:
    """Rows written, batches, flush latency and errors, by destination."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rows = Counter(
            "sluice_sink_rows_total", "Rows inserted.", ["destination"], registry=self.registry
        )
        self.batches = Counter(
            "sluice_sink_batches_total",
            "Batches inserted.",
            ["destination"],
            registry=self.registry,
        )
        self.errors = Counter(
            "sluice_sink_errors_total",
            "Failures by class.",
            ["destination", "error"],
            registry=self.registry,
        )
        self.deduplicated = Counter(
            "sluice_sink_deduplicated_records_total",
            "Records skipped because their offsets are loaded already (replays, redeliveries).",
            ["destination"],
            registry=self.registry,
        )
        self.new_columns = Counter(
            "sluice_sink_new_columns_total",
            "Columns added for new properties.",
            ["destination"],
            registry=self.registry,
        )
        self.discarded = Counter(
            "sluice_sink_discarded_values_total",
            "Values that did not fit their column's type (recorded in `discards`).",
            ["destination"],
            registry=self.registry,
        )
        self.overflow = Counter(
            "sluice_sink_overflow_total",
            "What a table limit kept out (recorded in `discards`): track events past a "
            "source's SLUICE_WAREHOUSE_MAX_EVENT_TABLES (limit=event_tables), property "
            "values past a table's SLUICE_WAREHOUSE_MAX_COLUMNS (limit=columns).",
            ["destination", "limit"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "sluice_sink_dead_lettered_records_total",
            "Records sent to the destination's DLQ: undecodable, or refused by the warehouse.",
            ["destination", "error"],
            registry=self.registry,
        )
        self.rebalances = Counter(
            "sluice_sink_partitions_total",
            "Partitions assigned to or revoked from this sink.",
            ["event"],
            registry=self.registry,
        )
        self.flush_seconds = Histogram(
            "sluice_sink_flush_seconds",
            "Time to insert a batch and commit it.",
            ["destination"],
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )


@dataclass
class _Buffer:
    """The open batch of one partition."""

    topic: str
    partition: int
    # The rebalance this buffer was made in: records fetched before it are stale.
    epoch: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    # The record each event came from, for its dead letter.
    messages: list[Message] = field(default_factory=list)
    first: int = -1
    last: int = -1
    opened: float = 0.0
    # Set after a restart: the batch must end exactly here to repeat its token.
    pending_end: int | None = None
    # Offset ranges already in the warehouse (a replay skips them), sorted; None while
    # they could not be read (the partition is paused and read again from `start`).
    loaded: list[tuple[int, int]] | None = field(default_factory=list)
    start: int = OFFSET_BEGINNING
    # Records that cannot be decoded: dead-lettered before the batch is committed.
    poison: list[tuple[Message, Exception]] = field(default_factory=list)
    # Records the warehouse refused, once the batch is loaded (kept across retries of
    # the dead-letter write, so the batch is not loaded again).
    refused: list[tuple[Message, Exception]] | None = None

    def __len__(self) -> int:
        return len(self.events)

    def is_loaded(self, offset: int) -> bool:
        if not self.loaded:
            return False
        i = bisect.bisect_right(self.loaded, (offset, 1 << 62)) - 1
        return i >= 0 and self.loaded[i][0] <= offset <= self.loaded[i][1]

    def reset(self) -> None:
        self.events = []
        self.messages = []
        self.poison = []
        self.refused = None
        self.first = self.last = -1
        self.pending_end = None


@dataclass(frozen=True)
class SinkTarget:
    """A destination topic, the raw table its events land in, and whether to fan out."""

    destination: str
    topic: str
    table: str
    layout: bool = True
    # The destination's DLQ (`DestinationTopics.dlq`); by default the topic's `.dlq`.
    dlq_topic: str | None = None

    @property
    def dlq(self) -> str:
        """Where records of this destination that cannot be loaded go."""
        return self.dlq_topic or f"{self.topic}.dlq"


class _Refused(Exception):
    """A load attempt was refused for good; `written` are the tables it wrote before."""

    def __init__(self, error: SluiceError, written: frozenset[str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.written = written


def _refusal(exc: Exception) -> SluiceError | None:
    """`exc` as a permanent refusal of a load, None when it is transient (or a bug)."""
    if isinstance(exc, ClickHouseError | OSError):
        exc = warehouse_error(exc, "warehouse")
    if isinstance(exc, SluiceError):
        return None if exc.retriable else exc
    if isinstance(exc, ValueError | TypeError | ArithmeticError):
        # Client-side: a property that is not JSON, a value no column type can take.
        return WarehouseRefused(f"the batch cannot be loaded: {type(exc).__name__}: {exc}")
    return None


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
        self.loader = Loader(warehouse)
        # After a failed load the loader's picture of the warehouse may be wrong: rebuilt.
        self._loader_stale = False
        self._stop = threading.Event()
        self._new_targets: list[SinkTarget] | None = None
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._kafka_conf = kafka.client_config()
        self._dlq: Producer | None = None
        # Records fetched while the sink waited out a failure: added once it is over.
        self._held: list[tuple[int, Message]] = []
        self._epoch = 0
        self._paused = False
        self._resolve_at = 0.0
        self._lag_at = 0.0
        self._consumer = Consumer(
            kafka.client_config()
            | {
                "group.id": settings.consumer_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": settings.session_timeout_ms,
                "max.poll.interval.ms": settings.max_poll_interval_ms,
            }
            | _static_membership(settings)
        )
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Create the tables and consume in a background thread."""
        for target in self.targets.values():
            self.loader.prepare(target.table)
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
                self.loader.prepare(target.table)
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
        for tp in committed:
            buf = _Buffer(tp.topic, tp.partition, self._epoch)
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
            try:
                buf.loaded = _merge(self.warehouse.loaded_ranges(tp.topic, tp.partition))
            except DestinationUnavailable as exc:
                # Read again once the warehouse answers (`_resolve`); until then the
                # partition's records are not taken (paused, and read again from `start`).
                log.warning("loaded offsets unreadable", topic=tp.topic, error=str(exc))
                buf.loaded = None
            self._buffers[(tp.topic, tp.partition)] = buf

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Uncommitted rows are simply dropped: the next owner reads them again from the
        # committed offset, and a pending marker makes it rebuild the same batch.
        self.metrics.rebalances.labels("revoked").inc(len(partitions))
        for tp in partitions:
            self._buffers.pop((tp.topic, tp.partition), None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._new_targets is not None:
                    self._retarget()
                if not self.targets:
                    self.watchdog.lag(0)
                    self._stop.wait(0.2)
                    continue
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
            self._flush_due(force=True)
        except Exception as exc:
            reason = f"warehouse sink loop died: {type(exc).__name__}: {exc}"
            log.exception("sink stopped by an error", reason=reason)
            self.watchdog.fail(reason)
            if self._on_death is not None:
                self._on_death(reason)
        finally:
            self._consumer.close()

    def _add(self, msg: Message, epoch: int) -> None:
        err = msg.error()
        if err is not None:
            if _fatal(KafkaException(err)):
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
                event["_topic"], event["_partition"], event["_offset"] = topic, partition, offset
                buf.events.append(event)
                buf.messages.append(msg)
        if buf.pending_end is not None and offset >= buf.pending_end:
            self._flush(buf)

    def _copy_of_loaded(self, msg: Message) -> bool:
        """Whether `msg` is a `sluice replay` copy of a record this sink has loaded."""
        headers = msg.headers()
        if not headers:
            return False
        for name, value in headers if isinstance(headers, list) else headers.items():
            if name == REPLAY_OF and value:
                text = value.decode() if isinstance(value, bytes) else value
                head, _, offset = text.rpartition(":")
                topic, _, partition = head.rpartition(":")
                try:
                    buf = self._buffers.get((topic, int(partition)))
                    return buf is not None and buf.is_loaded(int(offset))
                except ValueError:
                    return False
        return False

    def _resolve(self) -> None:
        """Read the loaded offsets of partitions assigned while the warehouse did not answer."""
        waiting = [b for b in self._buffers.values() if b.loaded is None]
        if not waiting:
            return
        self._consumer.pause([TopicPartition(b.topic, b.partition) for b in waiting])
        if time.monotonic() < self._resolve_at:
            return
        for buf in waiting:
            try:
                ranges = self.warehouse.loaded_ranges(buf.topic, buf.partition)
            except DestinationUnavailable as exc:
                log.warning("loaded offsets still unreadable", topic=buf.topic, error=str(exc))
                self._resolve_at = time.monotonic() + 2.0
                return
            tp = TopicPartition(buf.topic, buf.partition, buf.start)
            self._consumer.seek(tp)
            buf.loaded = _merge(ranges)
            if not self._paused:
                self._consumer.resume([tp])

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

    def _flush(self, buf: _Buffer) -> None:
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
                    buf.refused = self._load(target, buf)
                dead = buf.poison + buf.refused
                if dead:
                    self._dead_letter(target, dead)
                self._commit(buf, buf.last + 1, "")
                break
            except (DestinationUnavailable, KafkaException) as exc:
                if _fatal(exc):
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

    def _load(self, target: SinkTarget, buf: _Buffer) -> list[tuple[Message, Exception]]:
        """Load the batch; the records behind a permanent refusal are found and returned.

        The whole batch is tried first. Refused for good, it is halved, and each half is
        tried (and halved again) until single records are refused: those are returned for
        the DLQ, every other record is loaded. Each part's inserts carry the tokens of its
        own offset range, so a sink that crashes half way and tries again repeats the
        same parts without duplicates. Transient failures propagate to be retried.
        """
        refused: list[tuple[Message, Exception]] = []
        self._bisect(target, buf, 0, len(buf.events), frozenset(), refused)
        if refused:
            # The batch's whole range counts as loaded: a replay skips it (its refused
            # records are in the DLQ), and the offsets table says so.
            whole = Batch(buf.topic, buf.partition, buf.first, buf.last, [])
            try:
                self._attempt(target, whole)
            except _Refused as exc:
                log.warning("batch range not recorded", token=whole.token, error=str(exc))
            log.warning(
                "dead-lettering records the warehouse refused",
                destination=target.destination,
                count=len(refused),
                error=str(refused[0][1]),
            )
        buf.loaded = _merge([*(buf.loaded or []), (buf.first, buf.last)])
        return refused

    def _bisect(
        self,
        target: SinkTarget,
        buf: _Buffer,
        lo: int,
        hi: int,
        written: frozenset[str],
        refused: list[tuple[Message, Exception]],
    ) -> None:
        events = buf.events[lo:hi]
        if lo == 0 and hi == len(buf.events):
            first, last = buf.first, buf.last
        else:
            first, last = events[0]["_offset"], events[-1]["_offset"]
        try:
            self._attempt(target, Batch(buf.topic, buf.partition, first, last, events), written)
            return
        except _Refused as exc:
            failure = exc
        if hi - lo <= 1:
            if hi > lo:
                refused.append((buf.messages[lo], failure.error))
            return
        mid = (lo + hi) // 2
        self._bisect(target, buf, lo, mid, failure.written, refused)
        self._bisect(target, buf, mid, hi, failure.written, refused)

    def _attempt(
        self, target: SinkTarget, batch: Batch, written: frozenset[str] = frozenset()
    ) -> None:
        """Load one (part of a) batch; raises _Refused, or DestinationUnavailable to retry.

        The loader's inserts are staged, then run with the raw table and the offsets last,
        skipping tables a larger attempt that contained this one wrote already (`written`):
        those hold this part's rows once. A refusal says which tables it wrote.
        """
        try:
            if self._loader_stale:
                self.loader = Loader(self.warehouse)
                for each in self.targets.values():
                    self.loader.prepare(each.table)
                self._loader_stale = False
            with self.warehouse.staging() as staged:
                result = self.loader.load(batch, target.table, target.layout)
        except Exception as exc:
            self._loader_stale = True
            error = _refusal(exc)
            if error is None and isinstance(exc, ClickHouseError | OSError):
                raise warehouse_error(exc, "warehouse") from exc
            if error is None:
                raise
            raise _Refused(error, written) from exc
        done = set(written)
        for insert in sorted(staged, key=lambda i: _insert_order(i, target.table)):
            if insert.table in written:
                continue
            try:
                self.warehouse.run_insert(insert)
            except Exception as exc:
                self._loader_stale = True
                error = _refusal(exc)
                if error is None:
                    raise
                raise _Refused(error, frozenset(done)) from exc
            done.add(insert.table)
        self._count(target, result)

    def _count(self, target: SinkTarget, result: LoadResult) -> None:
        self.metrics.new_columns.labels(target.destination).inc(result.new_columns)
        self.metrics.discarded.labels(target.destination).inc(result.discarded)
        overflow = self.metrics.overflow
        overflow.labels(target.destination, "event_tables").inc(result.overflow_tables)
        overflow.labels(target.destination, "columns").inc(result.overflow_columns)

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
                if err is not None and _fatal(KafkaException(err)):
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
            assignment = self._consumer.assignment()
            positions = self._consumer.position(assignment) if assignment else []
            unknown = [tp for tp in positions if tp.offset < 0]
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in (self._consumer.committed(unknown, timeout=5) if unknown else [])
            }
            waiting = 0
            for tp in positions:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5)
                at = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
                waiting += max(0, high - (at if at >= 0 else low))
        except KafkaException as exc:
            log.warning("cannot measure the sink's lag", error=str(exc))
            return
        for buf in self._buffers.values():
            if buf.first >= 0:
                waiting += buf.last - buf.first + 1
        self.watchdog.lag(waiting)

    def _dead_letter(self, target: SinkTarget, dead: list[tuple[Message, Exception]]) -> None:
        if self._dlq is None:
            self._dlq = Producer(self._kafka_conf | {"enable.idempotence": True, "acks": "all"})
        failed: list[str] = []
        now_ms = int(time.time() * 1000)
        for msg, exc in dead:
            self._dlq.produce(
                target.dlq,
                msg.value(),
                msg.key(),
                headers=failure_headers(
                    message_headers(msg),
                    Origin(
                        msg.topic() or "",
                        msg.partition() or 0,
                        msg.offset() or 0,
                        msg.timestamp()[1],
                    ),
                    Failure(target.destination, "sink", exc, 1, now_ms, now_ms),
                ),
                on_delivery=lambda err, _m: failed.append(err.str()) if err else None,
            )
        if self._dlq.flush(30) or failed:
            raise KafkaException(f"dead letters not confirmed: {failed[:1] or 'timeout'}")
        for _msg, exc in dead:
            self.metrics.dead_lettered.labels(target.destination, type(exc).__name__).inc()
        log.warning("dead-lettered records", destination=target.destination, count=len(dead))

    def _commit(self, buf: _Buffer, offset: int, metadata: str) -> None:
        # Synchronous: the next step (insert, or the next batch) must not run ahead of it.
        tp = TopicPartition(buf.topic, buf.partition, offset, metadata=metadata)
        self._consumer.commit(offsets=[tp], asynchronous=False)


def _fatal(exc: Exception) -> bool:
    """Whether a Kafka error leaves the consumer unusable (fenced, say)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL)


def _insert_order(insert: StagedInsert, raw_table: str) -> tuple[bool, bool]:
    """Layout tables first, then the raw table, then the offsets (a stable sort)."""
    return (insert.table == OFFSETS_TABLE, insert.table == raw_table)


def _static_membership(settings: WarehouseSettings) -> dict[str, str]:
    instance = settings.instance_id
    if instance is None and settings.dsn.startswith("chdb:"):
        instance = f"{settings.consumer_group}-embedded"
    return {"group.instance.id": instance} if instance else {}


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ranges, adjacent ones joined."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged
