"""The warehouse sink: consume destination topics, insert exactly-once batches, commit.

Exactly-once rows come from deterministic batches. Before inserting offsets a..b of a
partition, the sink commits offset a with the metadata `pending:b`; then it inserts
with the token `topic:partition:a:b`; then it commits b+1. A sink that crashes in
between finds `pending:b` on restart, rebuilds exactly a..b, and inserts it again with
the same token, which ClickHouse's insert deduplication turns into a no-op.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Histogram

from connectors.clickhouse import Warehouse
from connectors.loader import Batch, Loader
from connectors.retry import Failure, Origin, failure_headers, message_headers
from ops.replay import REPLAY_OF
from ops.settings import KafkaSettings, WarehouseSettings
from schemas.codec import AvroCodec
from schemas.errors import DestinationUnavailable, SchemaError

log = structlog.get_logger("sluice.sink")

PENDING = "pending:"
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
    events: list[dict[str, Any]] = field(default_factory=list)
    first: int = -1
    last: int = -1
    opened: float = 0.0
    # Set after a restart: the batch must end exactly here to repeat its token.
    pending_end: int | None = None
    # Offset ranges already in the warehouse (a replay skips them), sorted.
    loaded: list[tuple[int, int]] = field(default_factory=list)
    # Records that cannot be decoded: dead-lettered before the batch is committed.
    poison: list[tuple[Message, Exception]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def is_loaded(self, offset: int) -> bool:
        i = bisect.bisect_right(self.loaded, (offset, 1 << 62)) - 1
        return i >= 0 and self.loaded[i][0] <= offset <= self.loaded[i][1]

    def reset(self) -> None:
        self.events = []
        self.poison = []
        self.first = self.last = -1
        self.pending_end = None


@dataclass(frozen=True)
class SinkTarget:
    """A destination topic, the raw table its events land in, and whether to fan out."""

    destination: str
    topic: str
    table: str
    layout: bool = True

    @property
    def dlq(self) -> str:
        """Where records of this destination that cannot be loaded go."""
        return f"{self.topic}.dlq"


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
    ) -> None:
        self.warehouse = warehouse
        self.targets = {t.topic: t for t in targets}
        self.settings = settings
        self.codec = codec
        self.metrics = metrics or SinkMetrics()
        self.loader = Loader(warehouse)
        self._stop = threading.Event()
        self._new_targets: list[SinkTarget] | None = None
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._kafka_conf = kafka.client_config()
        self._dlq: Producer | None = None
        self._consumer = Consumer(
            kafka.client_config()
            | {
                "group.id": settings.consumer_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": settings.session_timeout_ms,
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
        new = {t.topic: t for t in targets}
        if new == self.targets:
            return
        for target in new.values():
            self.loader.prepare(target.table)
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
        committed = consumer.committed(partitions, timeout=30)
        for tp in committed:
            buf = _Buffer(tp.topic, tp.partition)
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
            buf.loaded = _merge(self.warehouse.loaded_ranges(tp.topic, tp.partition))
            self._buffers[(tp.topic, tp.partition)] = buf

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Uncommitted rows are simply dropped: the next owner reads them again from the
        # committed offset, and a pending marker makes it rebuild the same batch.
        for tp in partitions:
            self._buffers.pop((tp.topic, tp.partition), None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._new_targets is not None:
                    self._retarget()
                if not self.targets:
                    self._stop.wait(0.2)
                    continue
                messages = self._consumer.consume(2000, timeout=0.2)
                for msg in messages:
                    self._add(msg)
                self._flush_due(force=False)
            self._flush_due(force=True)
        except Exception:
            log.exception("sink stopped by an error")
            raise
        finally:
            self._consumer.close()

    def _add(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error", error=err.str())
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        if topic is None or partition is None or offset is None:
            return
        buf = self._buffers.get((topic, partition))
        if buf is None:
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
        batch = Batch(buf.topic, buf.partition, buf.first, buf.last, buf.events)
        token = batch.token
        started = time.monotonic()
        delay = 0.5
        while True:
            try:
                self._commit(buf, buf.first, f"{PENDING}{buf.last}")
                if buf.poison:
                    self._dead_letter(target, buf.poison)
                if len(buf):
                    result = self.loader.load(batch, target.table, target.layout)
                    self.metrics.new_columns.labels(target.destination).inc(result.new_columns)
                    self.metrics.discarded.labels(target.destination).inc(result.discarded)
                    overflow = self.metrics.overflow
                    overflow.labels(target.destination, "event_tables").inc(result.overflow_tables)
                    overflow.labels(target.destination, "columns").inc(result.overflow_columns)
                    buf.loaded = _merge([*buf.loaded, (buf.first, buf.last)])
                self._commit(buf, buf.last + 1, "")
                break
            except (DestinationUnavailable, KafkaException) as exc:
                # Nothing is committed past the batch: keep trying, slowing only this sink.
                self.metrics.errors.labels(target.destination, type(exc).__name__).inc()
                log.warning(
                    "flush failed; retrying",
                    table=target.table,
                    token=token,
                    error=str(exc),
                    retry_in=delay,
                )
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 30.0)
        self.metrics.rows.labels(target.destination).inc(len(buf))
        self.metrics.batches.labels(target.destination).inc()
        self.metrics.flush_seconds.labels(target.destination).observe(time.monotonic() - started)
        buf.reset()

    def _dead_letter(self, target: SinkTarget, poison: list[tuple[Message, Exception]]) -> None:
        if self._dlq is None:
            self._dlq = Producer(self._kafka_conf | {"enable.idempotence": True, "acks": "all"})
        failed: list[str] = []
        now_ms = int(time.time() * 1000)
        for msg, exc in poison:
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
        log.warning(
            "dead-lettered undecodable records", destination=target.destination, count=len(poison)
        )

    def _commit(self, buf: _Buffer, offset: int, metadata: str) -> None:
        # Synchronous: the next step (insert, or the next batch) must not run ahead of it.
        tp = TopicPartition(buf.topic, buf.partition, offset, metadata=metadata)
        self._consumer.commit(offsets=[tp], asynchronous=False)


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
