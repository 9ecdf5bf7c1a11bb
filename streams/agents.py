"""The Faust app of the processing stage and its agents, registered explicitly.

The hot path batches: the consumer queues fetched messages on the agent's channel as
lists (streams/transport.py), `take_batches` hands the agent up to `batch_size` of
them, the router turns them into output records, and one confluent-kafka producer
sends the whole batch. The agent acks the events only after that returns, and the
producer call returns only when every output was confirmed, so committed offsets never
run ahead of durable output.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import faust
import structlog
from confluent_kafka import KafkaError
from faust.types import TP, ChannelT, EventT, Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.config import PipelineConfig
from core.config_topic import ConfigFollower
from core.errors import BrokerUnavailable
from core.kafka import BATCH_ERRORS, TOPIC_ERRORS, Record, delivery_error
from core.settings import KafkaSettings, WorkerSettings
from core.watchdog import StallWatchdog
from streams.errors import Fenced, Refused
from streams.health import serve
from streams.outputs import Outputs
from streams.processor import Incoming, OutRecord, Routed, Router
from streams.transactions import PartitionTransactions
from streams.transport import (
    QUEUED_BATCHES,
    BatchedTransport,
    TransactionalTransport,
    deliver_in_batches,
)

log = structlog.get_logger("sluice.worker")

BATCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ProcessorMetrics:
    """Events processed by destination and outcome, and batch latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "sluice_processor_events_total",
            "Events by destination and outcome: routed (records written), filtered,"
            " transformed (a transform returned), dropped (by a transform), failed (to the DLQ);"
            " rejected, unrouted and flagged (by a tracking plan) have no destination.",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "sluice_processor_batch_seconds",
            "Time to route a batch and have its output confirmed.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.lag = Gauge(
            "sluice_processor_consumer_lag",
            "Records of an ingest partition not processed yet, as of this worker's last batch"
            " from it.",
            ["topic", "partition"],
            registry=self.registry,
        )


def faust_brokers(bootstrap_servers: str) -> list[str]:
    """Faust's broker URLs for a librdkafka-style `host:port,host:port` list."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server]


def create_app(settings: WorkerSettings, kafka: KafkaSettings) -> faust.App:
    """A Faust app that only consumes the topics `sluice topics apply` created."""
    app = faust.App(
        settings.app_id,
        broker=faust_brokers(kafka.bootstrap_servers),
        key_serializer="raw",
        value_serializer="raw",
        datadir=str(settings.data_dir),
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A worker that died is noticed in 10 s, not Faust's default 60 s, so its
        # partitions move to the others quickly.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        producer_acks=-1,
    )
    # Fetched batches reach the agents under one flow-control check (streams/transport.py).
    transport = (
        TransactionalTransport
        if settings.processing_guarantee == "exactly_once"
        else BatchedTransport
    )
    app.transport = transport(app.conf.broker_consumer, app)
    return app


async def take_batches(
    stream: faust.StreamT[bytes], max_events: int, within_s: float
) -> AsyncIterator[list[Message]]:
    """Batches of up to `max_events` messages from the agent's channel, waiting `within_s`.

    Faust's `Stream.take_events` runs every event through the stream's per-event
    machinery (processors, context, a coroutine per ack): ~150 µs an event here. This
    drains the channel queue the stream would read, in bulk: lists of messages that
    `BatchedConsumer` queued for the topic (`deliver_in_batches`), or Faust's events.
    Like the stream, it tracks each message as pending until acked (a rebalance waits
    for those) and skips messages fetched before the current rebalance generation
    (the partition is read again from its committed offset). The caller acks each
    message once its outputs are confirmed, and Faust commits acked offsets as usual
    (a crash before the ack means the events are consumed again: at least once).
    """
    channel = stream.channel
    app = stream.app
    add_unacked = cast(Any, app.consumer)._unacked_messages.add
    # The agent's stream reads a channel iterator (a subscriber of the topic) and its queue.
    queue = cast(
        ChannelT[bytes], aiter(channel) if isinstance(channel, ChannelT) else channel
    ).queue
    loop = asyncio.get_running_loop()

    def current(item: list[Message] | EventT[bytes]) -> list[Message]:
        messages = item if isinstance(item, list) else [item.message]
        if not messages or messages[0].generation_id != app.consumer_generation_id:
            return []
        for message in messages:
            if not message.tracked:
                message.tracked = True
                add_unacked(message)
        return messages

    carry: list[Message] = []
    while True:
        if carry and carry[0].generation_id != app.consumer_generation_id:
            carry = []
        batch = carry
        carry = []
        while not batch:
            try:
                batch = list(current(await queue.get()))
            except StopAsyncIteration:
                return  # Faust ends its channels this way when the worker stops
        deadline = loop.time() + within_s
        while len(batch) < max_events:
            while not queue.empty() and len(batch) < max_events:
                batch.extend(current(queue.get_nowait()))
            left = deadline - loop.time()
            if len(batch) >= max_events or left <= 0:
                break
            try:
                batch.extend(current(await asyncio.wait_for(queue.get(), left)))
            except TimeoutError:
                break
        if len(batch) > max_events:
            batch, carry = batch[:max_events], batch[max_events:]
        yield batch


async def _route_in_transactions(
    app: faust.App,
    transactions: PartitionTransactions,
    router: Router,
    route: Callable[[list[Incoming]], Awaitable[list[Routed]]],
    messages: list[Message],
    batch: list[Incoming],
    stopping: asyncio.Event,
) -> tuple[list[Routed], list[Message], dict[str, int]]:
    """Exactly-once: each input partition's outputs and next offset in one transaction.

    Returns what was routed, the messages to ack (those of partitions whose transaction
    committed; a partition that moved belongs to another worker now, which reads it
    again) and the outputs Kafka refused, by destination (in DLQs instead).
    """
    loop = asyncio.get_running_loop()
    parts: dict[tuple[str, int], list[int]] = {}
    for i, rec in enumerate(batch):
        parts.setdefault((rec.topic, rec.partition), []).append(i)

    async def one(
        tp: tuple[str, int], indexes: list[int]
    ) -> tuple[list[Routed], list[int], dict[str, int]]:
        start = await loop.run_in_executor(
            None, transactions.committed_offset, tp[0], tp[1], app.consumer_generation_id
        )
        # Events below the committed offset were processed (their outputs committed) by a
        # transaction that was still completing when Faust read the offsets: ack them.
        done = [i for i in indexes if start is not None and batch[i].offset < start]
        todo = [i for i in indexes if start is None or batch[i].offset >= start]
        if not todo or transactions.lost(*tp):
            return [], done, {}
        passes = await route([batch[i] for i in todo])
        outputs: dict[str, list[OutRecord]] = {}
        origins: dict[str, list[Incoming]] = {}
        for routed in passes:
            for topic, records in routed.outputs.items():
                outputs.setdefault(topic, []).extend(records)
                origins.setdefault(topic, []).extend(routed.origins[topic])
        first, next_offset = batch[todo[0]].offset, batch[todo[-1]].offset + 1
        alone: dict[str, list[OutRecord]] = {}
        origin_of: dict[int, Incoming] = {}
        refused: dict[str, int] = {}
        renew, delay = False, 0.5
        while True:
            if TP(*tp) not in app.consumer.assignment():
                # Revoked meanwhile: opening its producer again would fence the new owner.
                return [], [], {}
            try:
                if renew:
                    # A failed transaction's producer is never used again. The new one
                    # fences any other, and then the committed offset is final.
                    committed = await loop.run_in_executor(None, transactions.renew, *tp)
                    renew = False
                    if committed is not None and committed >= next_offset:
                        return [], done + todo, {}  # committed meanwhile, by another owner
                    if committed is not None and committed != first:
                        log.warning(
                            "partition committed by another owner; leaving it",
                            topic=tp[0],
                            partition=tp[1],
                            committed=committed,
                        )
                        transactions.lose(*tp)
                        return [], [], {}
                await loop.run_in_executor(
                    None, transactions.commit, tp[0], tp[1], outputs, next_offset, alone
                )
                return passes, done + todo, refused
            except Refused as exc:
                renew = True
                if not origin_of:
                    origin_of = {
                        id(record): origin
                        for topic, listed in outputs.items()
                        for record, origin in zip(listed, origins[topic], strict=True)
                    }
                if not _replace_refused(router, exc.records, outputs, alone, origin_of, refused):
                    if stopping.is_set():
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            except Fenced as exc:
                renew = True
                log.warning("transactional producer fenced; replacing it", error=str(exc))
            except BrokerUnavailable as exc:
                renew = True
                if stopping.is_set():
                    raise
                log.warning("transaction not committed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    results = await asyncio.gather(*(one(tp, idx) for tp, idx in parts.items()))
    routed = [r for passes, _, _ in results for r in passes]
    acked = [messages[i] for _, indexes, _ in results for i in indexes]
    refused: dict[str, int] = {}
    for _, _, counts in results:
        for dest, count in counts.items():
            refused[dest] = refused.get(dest, 0) + count
    return routed, acked, refused


def _replace_refused(
    router: Router,
    records: list[tuple[str, Record, KafkaError]],
    outputs: dict[str, list[OutRecord]],
    alone: dict[str, list[OutRecord]],
    origin_of: dict[int, Incoming],
    refused: dict[str, int],
) -> bool:
    """Change a transaction's outputs after Kafka refused some of them for good.

    A record refused together with others (a record batch's error) is sent alone next
    time, for its own verdict; one refused alone (or by the producer itself, or for its
    topic) is replaced by its dead letter (`Router.dead_letter`). Records are found by
    identity; `origin_of` maps each to its input record. False when a record could not be
    dead-lettered either: the caller waits before it tries again.
    """
    replaced = True
    for topic, refused_record, err in records:
        record = cast(OutRecord, refused_record)  # one of `outputs`' own records
        origin = origin_of[id(record)]
        if any(r is record for r in alone.get(topic, ())):
            alone[topic] = [r for r in alone[topic] if r is not record]
        else:
            outputs[topic] = [r for r in outputs[topic] if r is not record]
            if err.code() in BATCH_ERRORS:
                alone.setdefault(topic, []).append(record)
                continue
        error = delivery_error(err, topic)
        dead = router.dead_letter(topic, record, origin, error, err.code() in TOPIC_ERRORS)
        if dead is None:
            # Even the dead letter without its value was refused: keep trying (the stall
            # shows in `/ready`), never drop it.
            outputs[topic].append(record)
            replaced = False
            continue
        log.warning(
            "output refused; dead-lettered",
            topic=topic,
            to=dead.topic,
            error=str(error),
            offset=origin.offset,
            partition=origin.partition,
        )
        outputs.setdefault(dead.topic, []).append(dead.record)
        origin_of[id(dead.record)] = origin
        if dead.refused_for is not None:
            refused[dead.refused_for] = refused.get(dead.refused_for, 0) + 1
    return replaced


def _count(metrics: ProcessorMetrics, passes: list[Routed], refused: dict[str, int]) -> None:
    """Count a batch's outcomes; outputs Kafka refused count as refused, not routed."""
    delivered: dict[str, int] = {}
    for routed in passes:
        for dest, count in routed.delivered.items():
            delivered[dest] = delivered.get(dest, 0) + count
    for dest, count in refused.items():
        delivered[dest] = max(0, delivered.get(dest, 0) - count)
    for dest, count in delivered.items():
        if count:
            metrics.events.labels(dest, "routed").inc(count)
    for dest, count in refused.items():
        metrics.events.labels(dest, "refused").inc(count)
    for routed in passes:
        for outcome, counts in (
            ("filtered", routed.filtered),
            ("transformed", routed.transformed),
            ("dropped", routed.dropped),
            ("failed", routed.failed),
        ):
            for dest, count in counts.items():
                metrics.events.labels(dest, outcome).inc(count)
        for outcome, count in (
            ("rejected", routed.rejected),
            ("unrouted", routed.unrouted),
            ("flagged", routed.flagged),
        ):
            if count:
                metrics.events.labels("", outcome).inc(count)


class _Progress:
    """Where the agent is per partition, for the lag gauge and the stall watchdog."""

    def __init__(self, app: faust.App, metrics: ProcessorMetrics, watchdog: StallWatchdog) -> None:
        self.app = app
        self.metrics = metrics
        self.watchdog = watchdog
        # Per ingest partition, the offset after the last event processed (acked) here.
        self.next_offsets: dict[TP, int] = {}
        self.died: str | None = None

    def moved(self, acked: list[Message]) -> None:
        """A batch's outputs are confirmed and these messages acked."""
        if not acked:
            return
        next_offsets = self.next_offsets
        for message in acked:
            tp = message.tp
            if message.offset >= next_offsets.get(tp, -1):
                next_offsets[tp] = message.offset + 1
        self.watchdog.progress()
        self.refresh()

    def refresh(self) -> None:
        """Lag of each assigned partition: what the broker has past what was processed."""
        consumer = self.app.consumer
        committed = cast(Any, consumer)._committed_offset
        total = 0
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            position = self.next_offsets.get(tp)
            if position is None:
                position = committed.get(tp) or 0
            if highwater is None:
                continue
            waiting = max(0, highwater - position)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(waiting)
            total += waiting
        self.watchdog.lag(total)


def register(
    app: faust.App,
    settings: WorkerSettings,
    kafka: KafkaSettings,
    router: Router,
    metrics: ProcessorMetrics,
    config_current: Callable[[float], bool],
    watchdog: StallWatchdog | None = None,
) -> _Progress:
    """Add the processor agent to `app`; returns what tracks its progress.

    `config_current(timeout)` blocks until the worker has read the config topic to its
    end: called when a batch holds events of a source the router does not know yet.
    """
    ingest = app.topic(
        router.topics.ingest, key_type=bytes, value_type=bytes, maxsize=QUEUED_BATCHES
    )
    deliver_in_batches(app, router.topics.ingest)
    stopping = asyncio.Event()
    progress = _Progress(
        app, metrics, watchdog or StallWatchdog("processor", settings.stall_after_s)
    )

    async def observe_lag() -> None:
        # Also while a batch is stuck: the lag must show for the watchdog to see a stall.
        while True:
            await asyncio.sleep(1.0)
            progress.refresh()

    @app.agent(ingest)
    async def processor(stream: faust.StreamT[bytes]) -> None:
        # Faust's start-up leaves loggers at DEBUG; building those records costs ~60 µs an event.
        level = logging.getLevelName(settings.log_level.upper())
        for name in ("", "faust", "mode", "aiokafka", "kafka"):
            logging.getLogger(name).setLevel(level)
        outputs = Outputs(kafka, settings.produce_timeout_s, router, stopping)
        transactions = None
        if settings.processing_guarantee == "exactly_once":
            transactions = PartitionTransactions(kafka, settings.app_id)
        loop = asyncio.get_running_loop()
        observer = asyncio.create_task(observe_lag())

        async def route(batch: list[Incoming]) -> list[Routed]:
            routed = router.route(batch)
            if not routed.unknown:
                return [routed]
            # A write key the gateway already accepts: catch up with the config topic,
            # then route them (or reject them, named, if the source is still unknown).
            if not await loop.run_in_executor(None, config_current, 10.0):
                log.warning("config topic not read to its end; routing with what is known")
            return [routed, router.route(routed.unknown, final=True)]

        try:
            async for messages in take_batches(
                stream, settings.batch_size, settings.batch_within_s
            ):
                started = loop.time()
                progress.refresh()  # the batch's own events wait too, until it is done
                batch = [
                    Incoming(
                        m.key,
                        m.value or b"",
                        m.topic,
                        m.partition,
                        m.offset,
                        int((m.timestamp or 0) * 1000),
                    )
                    for m in messages
                ]
                if transactions is None:
                    passes = await route(batch)
                    refused = await outputs.deliver(passes)
                    acked = messages
                else:
                    passes, acked, refused = await _route_in_transactions(
                        app, transactions, router, route, messages, batch, stopping
                    )
                _count(metrics, passes, refused)
                metrics.batch_seconds.observe(loop.time() - started)
                # Every output of the batch is confirmed: now its offsets may be committed.
                consumer = app.consumer
                for message in acked:
                    message.ack(consumer)
                progress.moved(acked)
        except Exception as exc:
            # Faust would log a crashed agent and leave its partitions assigned and idle:
            # stop the worker instead, so that its partitions move to the others.
            log.exception("processor failed; stopping the worker", error=str(exc))
            progress.died = f"processor agent died: {type(exc).__name__}: {exc}"
            progress.watchdog.fail(progress.died)
            os.kill(os.getpid(), signal.SIGTERM)
            raise
        finally:
            stopping.set()
            observer.cancel()
            if transactions is not None:
                await loop.run_in_executor(None, transactions.close)
            # Anything handed to librdkafka is delivered before Faust commits on shutdown.
            left = await asyncio.get_running_loop().run_in_executor(None, outputs.close)
            if left:
                log.error("outputs not delivered at shutdown", count=left)

    return progress


def run(
    settings: WorkerSettings, kafka: KafkaSettings, router: Router, cfg: PipelineConfig
) -> None:
    """Run the worker until SIGTERM/SIGINT; Faust waits for in-flight batches, then commits."""
    import uvloop  # noqa: PLC0415 - only the worker process needs it

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, kafka)
    metrics = ProcessorMetrics()
    watchdog = StallWatchdog("processor", settings.stall_after_s, registry=metrics.registry)
    # The router imports a new config's transforms (allowed modules only); a failure to
    # import refuses that config and the worker keeps routing by the one it has.
    follower = ConfigFollower(kafka, cfg, router.update, router.transforms, metrics.registry)
    progress = register(app, settings, kafka, router, metrics, follower.wait_current, watchdog)
    if settings.metrics_port:
        try:
            serve(
                settings.metrics_host,
                settings.metrics_port,
                metrics.registry,
                watchdog,
                lambda: progress.died,
            )
        except OSError as exc:
            # A second worker on the same host: it runs, its metrics need another port.
            log.warning("metrics port taken; set SLUICE_WORKER_METRICS_PORT", error=str(exc))
    asyncio.set_event_loop(uvloop.new_event_loop())
    follower.start()
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        follower.stop()
