"""The delivery process: every webhook destination's topic, retry tiers and DLQ.

It owns no warehouse, so any number of them can run side by side: each destination
is a consumer group of its own (`<SLUICE_DELIVERY_CONSUMER_GROUP>-<destination>`) and
Kafka shares its partitions between the processes. It follows the config topic:
destinations appear, change and go without a restart.

`/ready` tells the truth: it fails while a destination's loop has records it could move
on but moved none for `SLUICE_DELIVERY_STALL_AFTER_S` (a loop stuck in an await), once
a loop died, and while the config topic cannot be read (or has not been read to its end
yet), each under its name (a destination's, the config topic's); a dead loop also stops
the process with exit status 1, so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from connectors.delivery import DeliveryMetrics, WebhookDelivery
from core.config import PipelineConfig, WebhookConfig
from core.config_topic import ConfigFollower
from core.settings import DeliverySettings, KafkaSettings, TransformSettings
from core.shell import Probe, Probes, run_app
from core.topics import Topics
from schemas.codec import event_codec

log = structlog.get_logger("sluice.delivery")

REGISTRY = web.AppKey("registry", CollectorRegistry)
CONFIG = web.AppKey("config", ConfigFollower)


def webhook_deliveries(
    cfg: PipelineConfig,
    kafka: KafkaSettings,
    group: str,
    metrics: DeliveryMetrics,
    settings: DeliverySettings | None = None,
) -> dict[str, WebhookDelivery]:
    """One delivery loop per enabled webhook destination, each in a group of its own."""
    topics = Topics(kafka.topic_prefix)
    deliveries = {}
    for dest in cfg.destinations:
        connector = dest.connector()
        if isinstance(connector, WebhookConfig) and dest.enabled:
            deliveries[dest.id] = WebhookDelivery(
                dest.id,
                topics.destination(dest.id, dest.retry.tiers),
                connector,
                kafka,
                f"{group}-{dest.id}",
                event_codec(logical_types=False),
                metrics,
                dest.retry,
                settings,
            )
    return deliveries


class Deliveries:
    """The running delivery loops; `apply` makes them match a config."""

    def __init__(
        self,
        kafka: KafkaSettings,
        group: str,
        metrics: DeliveryMetrics,
        settings: DeliverySettings | None = None,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.group = group
        self.metrics = metrics
        self.running: dict[str, WebhookDelivery] = {}
        # Loops that died, with why: the process is not ready again and exits with 1.
        self.failed: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changing = asyncio.Lock()

    async def apply(self, cfg: PipelineConfig) -> None:
        """Start, restart (settings or retry policy changed) and stop loops to match `cfg`."""
        async with self._changing:
            wanted = webhook_deliveries(cfg, self.kafka, self.group, self.metrics, self.settings)
            gone = [
                name
                for name, running in self.running.items()
                if name not in wanted
                or (running.cfg, running.policy) != (wanted[name].cfg, wanted[name].policy)
            ]
            # A stopped loop commits and leaves the group before its successor joins it.
            await self._stop(gone)
            for name, delivery in wanted.items():
                if name not in self.running:
                    self.running[name] = delivery
                    task = asyncio.create_task(delivery.run(), name=name)
                    task.add_done_callback(self._ended)
                    self._tasks[name] = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (error := task.exception()) is None:
            return
        # A loop that failed (not one that was stopped): not ready from now on, and the
        # process stops (exit status 1), so that its supervisor restarts it and the
        # destination's partitions go on from their committed offsets (here or in another
        # delivery process).
        cause = error.__cause__ or error
        self.failed[task.get_name()] = f"delivery loop {task.get_name()} died: {cause!r}"
        log.error("delivery loop failed; stopping", destination=task.get_name())
        os.kill(os.getpid(), signal.SIGTERM)

    def problems(self) -> dict[str, str]:
        """Why destinations are not ready: a dead loop, a stall; empty when all are ready."""
        found = dict(self.failed)
        for name, delivery in self.running.items():
            if name not in found and (problem := delivery.problem()) is not None:
                found[name] = problem
        return found

    async def stop(self) -> None:
        """Stop every loop: each finishes the records in hand and commits."""
        async with self._changing:
            await self._stop(list(self.running))

    async def _stop(self, names: list[str]) -> None:
        for name in names:
            self.running.pop(name).stop()
        results = await asyncio.gather(
            *(self._tasks.pop(name) for name in names), return_exceptions=True
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("delivery loop failed", destination=name, error=repr(result))


DELIVERIES = web.AppKey("deliveries", Deliveries)


def _probes(app: web.Application) -> Probes:
    """`/health`: 503 once a destination's loop died (the process is stopping) or the config
    follower's thread did; `/ready`: 503 while a destination's loop is dead or stalled, or
    the config topic cannot be read yet; both name the running destinations."""
    deliveries = app[DELIVERIES]

    def with_config(found: dict[str, str], problem: str | None) -> Probe:
        if problem is not None:
            found[app[CONFIG].topic] = problem
        return found or None

    def alive() -> Probe:
        return with_config(dict(deliveries.failed), app[CONFIG].failure())

    def moving() -> Probe:
        return with_config(deliveries.problems(), app[CONFIG].problem())

    return Probes(
        app[REGISTRY], alive, moving, lambda: {"destinations": sorted(deliveries.running)}
    )


def create_app(
    settings: DeliverySettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings | None = None,
) -> web.Application:
    """The delivery process's app: the loops run from startup to cleanup.

    `transforms`: the modules config records may name transforms from (None: none).
    """
    app = web.Application()
    app[REGISTRY] = CollectorRegistry()
    app[DELIVERIES] = Deliveries(
        kafka, settings.consumer_group, DeliveryMetrics(app[REGISTRY]), settings
    )

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        deliveries = app[DELIVERIES]
        await deliveries.apply(cfg)
        changes: set[asyncio.Task[None]] = set()

        def follow(new: PipelineConfig) -> None:
            change = loop.create_task(deliveries.apply(new))
            changes.add(change)
            change.add_done_callback(changes.discard)

        follower = ConfigFollower(
            kafka,
            cfg,
            lambda new: loop.call_soon_threadsafe(follow, new),
            transforms,
            app[REGISTRY],
        )
        app[CONFIG] = follower
        follower.start()
        log.info("deliveries started", destinations=sorted(deliveries.running))
        yield
        stopping = loop.run_in_executor(None, follower.stop)
        await asyncio.gather(*changes, return_exceptions=True)
        await deliveries.stop()
        await stopping
        log.info("deliveries stopped")

    app.cleanup_ctx.append(lifecycle)
    _probes(app).add_routes(app)
    return app


def run(
    settings: DeliverySettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings,
) -> None:
    """Serve until SIGTERM/SIGINT; in-flight records finish and their offsets are committed.

    Exits with status 1 when it stopped because a delivery loop died.
    """
    app = create_app(settings, kafka, cfg, transforms)
    run_app(app, settings.host, settings.port)
    if failed := app[DELIVERIES].failed:
        # A dead loop stopped the process: say so to its supervisor.
        log.error("stopped after a delivery loop died", destinations=sorted(failed))
        raise SystemExit(1)
