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
from faust.types import TP, ChannelT, EventT, Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ops.config import PipelineConfig
from ops.live import ConfigFollower
from ops.producer import EventProducer, Record
from ops.settings import KafkaSettings, WorkerSettings
from schemas.errors import BrokerUnavailable
from streams.processor import Incoming, Routed, Router
from streams.transactions import Fenced, PartitionTransactions
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


async def _send_until_confirmed(
    producer: EventProducer, topic: str, records: list[Any], stopping: asyncio.Event
) -> None:
    """Retry a batch until Kafka confirms it: an unconfirmed batch must never be acked."""
    delay = 0.5
    while True:
        try:
            await producer.send_batch(topic, records)
            return
        except BrokerUnavailable as exc:
            log.warning("output not confirmed; retrying", topic=topic, error=str(exc))
            if stopping.is_set():
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


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


def _observe_lag(app: faust.App, metrics: ProcessorMetrics, batch: list[Incoming]) -> None:
    last: dict[tuple[str, int], int] = {}
    for rec in batch:
        last[(rec.topic, rec.partition)] = max(rec.offset, last.get((rec.topic, rec.partition), -1))
    assigned = app.consumer.assignment()
    for (topic, partition), offset in last.items():
        tp = TP(topic, partition)
        if tp not in assigned:
            continue  # revoked by a rebalance while the batch was under way
        highwater = app.consumer.highwater(tp)
        if highwater is not None:
            metrics.lag.labels(topic, str(partition)).set(max(0, highwater - offset - 1))


async def _route_in_transactions(
    app: faust.App,
    transactions: PartitionTransactions,
    route: Callable[[list[Incoming]], Awaitable[list[Routed]]],
    messages: list[Message],
    batch: list[Incoming],
    stopping: asyncio.Event,
) -> tuple[list[Routed], list[Message]]:
    """Exactly-once: each input partition's outputs and next offset in one transaction.

    Returns what was routed and the messages to ack: those of partitions whose transaction
    committed (a fenced partition belongs to another worker now, which reads it again).
    """
    loop = asyncio.get_running_loop()
    parts: dict[tuple[str, int], list[int]] = {}
    for i, rec in enumerate(batch):
        parts.setdefault((rec.topic, rec.partition), []).append(i)

    async def one(tp: tuple[str, int], indexes: list[int]) -> tuple[list[Routed], list[int]]:
        start = await loop.run_in_executor(
            None, transactions.committed_offset, tp[0], tp[1], app.consumer_generation_id
        )
        # Events below the committed offset were processed (their outputs committed) by a
        # transaction that was still completing when Faust read the offsets: ack them.
        done = [i for i in indexes if start is not None and batch[i].offset < start]
        todo = [i for i in indexes if start is None or batch[i].offset >= start]
        if not todo:
            return [], done
        passes = await route([batch[i] for i in todo])
        outputs: dict[str, list[Record]] = {}
        for routed in passes:
            for topic, records in routed.outputs.items():
                outputs.setdefault(topic, []).extend(records)
        next_offset = batch[todo[-1]].offset + 1
        delay = 0.5
        while True:
            if TP(*tp) not in app.consumer.assignment():
                # Revoked meanwhile: opening its producer again would fence the new owner.
                return [], []
            try:
                await loop.run_in_executor(
                    None, transactions.commit, tp[0], tp[1], outputs, next_offset
                )
                return passes, done + todo
            except Fenced as exc:
                log.warning("partition moved to another worker", error=str(exc))
                return [], []
            except BrokerUnavailable as exc:
                if stopping.is_set():
                    raise
                log.warning("transaction not committed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    results = await asyncio.gather(*(one(tp, idx) for tp, idx in parts.items()))
    routed = [r for passes, _ in results for r in passes]
    acked = [messages[i] for _, indexes in results for i in indexes]
    return routed, acked


def _count(metrics: ProcessorMetrics, routed: Routed) -> None:
    for outcome, counts in (
        ("routed", routed.delivered),
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


def register(
    app: faust.App,
    settings: WorkerSettings,
    kafka: KafkaSettings,
    router: Router,
    metrics: ProcessorMetrics,
    config_current: Callable[[float], bool],
) -> None:
    """Add the processor agent to `app`.

    `config_current(timeout)` blocks until the worker has read the config topic to its
    end: called when a batch holds events of a source the router does not know yet.
    """
    ingest = app.topic(
        router.topics.ingest, key_type=bytes, value_type=bytes, maxsize=QUEUED_BATCHES
    )
    deliver_in_batches(app, router.topics.ingest)
    stopping = asyncio.Event()

    @app.agent(ingest)
    async def processor(stream: faust.StreamT[bytes]) -> None:
        # Faust's start-up leaves loggers at DEBUG; building those records costs ~60 µs an event.
        level = logging.getLevelName(settings.log_level.upper())
        for name in ("", "faust", "mode", "aiokafka", "kafka"):
            logging.getLogger(name).setLevel(level)
        producer = EventProducer(kafka, settings.produce_timeout_s, linger_ms=5)
        transactions = None
        if settings.processing_guarantee == "exactly_once":
            transactions = PartitionTransactions(kafka, settings.app_id)
        loop = asyncio.get_running_loop()

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
                    for done in passes:
                        await asyncio.gather(
                            *(
                                _send_until_confirmed(producer, topic, records, stopping)
                                for topic, records in done.outputs.items()
                            )
                        )
                    acked = messages
                else:
                    passes, acked = await _route_in_transactions(
                        app, transactions, route, messages, batch, stopping
                    )
                for done in passes:
                    _count(metrics, done)
                metrics.batch_seconds.observe(loop.time() - started)
                # Every output of the batch is confirmed: now its offsets may be committed.
                consumer = app.consumer
                for message in acked:
                    message.ack(consumer)
                _observe_lag(app, metrics, batch)
        except Exception as exc:
            # Faust would log a crashed agent and leave its partitions assigned and idle:
            # stop the worker instead, so that its partitions move to the others.
            log.exception("processor failed; stopping the worker", error=str(exc))
            os.kill(os.getpid(), signal.SIGTERM)
            raise
        finally:
            stopping.set()
            if transactions is not None:
                await loop.run_in_executor(None, transactions.close)
            # Anything handed to librdkafka is delivered before Faust commits on shutdown.
            left = await asyncio.get_running_loop().run_in_executor(None, producer.close)
            if left:
                log.error("outputs not delivered at shutdown", count=left)


def run(
    settings: WorkerSettings, kafka: KafkaSettings, router: Router, cfg: PipelineConfig
) -> None:
    """Run the worker until SIGTERM/SIGINT; Faust waits for in-flight batches, then commits."""
    import uvloop  # noqa: PLC0415 - only the worker process needs it

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, kafka)
    metrics = ProcessorMetrics()
    # The router imports a new config's transforms (allowed modules only); a failure to
    # import refuses that config and the worker keeps routing by the one it has.
    follower = ConfigFollower(kafka, cfg, router.update, router.transforms, metrics.registry)
    register(app, settings, kafka, router, metrics, follower.wait_current)
    if settings.metrics_port:
        try:
            start_http_server(
                settings.metrics_port, settings.metrics_host, registry=metrics.registry
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
