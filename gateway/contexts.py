"""The gateway app's resources, opened with the app and closed after its last request.

The producer flushes what it holds before the process exits; the config follower
swaps new sources and write keys into the app's table on the event loop; the job status
follower keeps the status of every job for `GET /v1/jobs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from core.config import PipelineConfig
from core.config_topic import ConfigFollower
from core.follower import CompactedFollower
from core.job_stats import QueueFigures
from core.jobs import StatusTable
from core.producer import EventProducer
from core.settings import GatewaySettings, KafkaSettings, TransformSettings
from core.topics import Topics
from gateway.app_keys import (
    CONFIG,
    JOB_KEYS,
    JOB_STATUS,
    METRICS,
    PRODUCER,
    RUN_KEYS,
    SOURCES,
    JobStatuses,
)

log = structlog.get_logger("sluice.gateway")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def producer_ctx(kafka: KafkaSettings, settings: GatewaySettings) -> CleanupContext:
    """The app's event producer (`PRODUCER`), flushed when the app closes."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        producer = EventProducer(kafka, settings.produce_timeout_s, settings.linger_ms)
        app[PRODUCER] = producer
        yield
        left = await asyncio.get_running_loop().run_in_executor(None, producer.close)
        if left:
            log.error("records not delivered at shutdown", count=left)

    return ctx


def config_ctx(
    kafka: KafkaSettings, cfg: PipelineConfig, transforms: TransformSettings | None
) -> CleanupContext:
    """A follower of the config topic (`CONFIG`) that updates the app's sources (`SOURCES`)
    and submit keys (`JOB_KEYS`)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        sources, job_keys, run_keys = app[SOURCES], app[JOB_KEYS], app[RUN_KEYS]

        def update(new: PipelineConfig) -> None:
            sources.update(new)
            job_keys.update(new)
            run_keys.update(new)

        follower = ConfigFollower(
            kafka,
            cfg,
            lambda new: loop.call_soon_threadsafe(update, new),
            transforms,
            app[METRICS].registry,
        )
        app[CONFIG] = follower
        follower.start()
        yield
        await loop.run_in_executor(None, follower.stop)

    return ctx


def job_status_ctx(kafka: KafkaSettings) -> CleanupContext:
    """A follower of the job status topic into the app's status table (`JOB_STATUS`), with
    the queues' figures kept as statuses change and the DEAD gauge in the app's metrics."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        table = StatusTable()
        figures = QueueFigures()
        table.watch(figures.changed)
        follower = CompactedFollower(
            kafka, Topics(kafka.topic_prefix).jobs_status, table.apply, name="gateway-jobs"
        )
        app[JOB_STATUS] = JobStatuses(table, follower, figures)
        app[METRICS].watch_jobs(table, figures)
        follower.start()
        yield
        await loop.run_in_executor(None, follower.stop)

    return ctx
