"""The processor agent, registered explicitly on the worker's Faust app, and the worker's `run`.

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
from collections.abc import Callable

import faust
import structlog

from core.config import PipelineConfig
from core.config_topic import ConfigFollower
from core.settings import KafkaSettings, WorkerSettings
from core.watchdog import StallWatchdog
from streams.batches import take_batches
from streams.exactly_once import route_in_transactions
from streams.faust_app import create_app
from streams.health import serve
from streams.metrics import ProcessorMetrics, count_outcomes
from streams.outputs import Outputs
from streams.processor import Incoming, Routed, Router
from streams.progress import Progress
from streams.transactions import PartitionTransactions
from streams.transport import QUEUED_BATCHES, deliver_in_batches

log = structlog.get_logger("sluice.worker")


def register(
    app: faust.App,
    settings: WorkerSettings,
    kafka: KafkaSettings,
    router: Router,
    metrics: ProcessorMetrics,
    config_current: Callable[[float], bool],
    watchdog: StallWatchdog | None = None,
) -> Progress:
    """Add the processor agent to `app`; returns what tracks its progress.

    `config_current(timeout)` blocks until the worker has read the config topic to its
    end: called when a batch holds events of a source the router does not know yet.
    """
    ingest = app.topic(
        router.topics.ingest, key_type=bytes, value_type=bytes, maxsize=QUEUED_BATCHES
    )
    deliver_in_batches(app, router.topics.ingest)
    stopping = asyncio.Event()
    progress = Progress(
        app, metrics, watchdog or StallWatchdog("processor", settings.stall_after_s)
    )

    async def observe_lag() -> None:
        # Also while a batch is stuck: the lag must show for the watchdog to see a stall.
        while True:
            await asyncio.sleep(1.0)
            progress.refresh()

    @app.agent(ingest)
    async def processor(stream: faust.StreamT[bytes]) -> None:
        # Faust's start-up leaves loggers at DEBUG: debug records built for every event
        # would take a large share of the worker's time (BENCHMARKS.md).
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
                    passes, acked, refused = await route_in_transactions(
                        app, transactions, router, route, messages, batch, stopping
                    )
                count_outcomes(metrics, passes, refused)
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
                follower,
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
