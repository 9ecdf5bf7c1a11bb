"""The sink process: owns the warehouse, runs the warehouse sink, answers read-only queries.

In embedded mode no other process may open the warehouse folder, so `sluice sql` sends
its statement here (127.0.0.1 by default) instead of opening the folder itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from connectors.warehouse.clickhouse import Warehouse
from connectors.warehouse.metrics import SinkMetrics
from connectors.warehouse.query_api import QueryEndpoint
from connectors.warehouse.query_auth import ensure_token
from connectors.warehouse.sink import WarehouseSink
from connectors.warehouse.targets import sink_targets
from core.config import PipelineConfig
from core.config_topic import ConfigFollower
from core.settings import KafkaSettings, TransformSettings, WarehouseSettings
from core.shell import Probe, Probes, graceful_exit, joined, run_app
from core.topics import Topics
from core.watchdog import StallWatchdog
from schemas.codec import event_codec

log = structlog.get_logger("sluice.sink")

WAREHOUSE = web.AppKey("warehouse", Warehouse)
SINK = web.AppKey("sink", WarehouseSink)
METRICS = web.AppKey("metrics", SinkMetrics)
WATCHDOG = web.AppKey("watchdog", StallWatchdog)
# `POST /query`: authenticated, read-only, bounded (connectors/warehouse/query_api.py).
QUERY = web.AppKey("query", QueryEndpoint)
# Why the sink's loop died, if it did (the process then exits with status 1).
DEATH = web.AppKey("death", list[str])
# The follower of the config topic: the sink's destinations come and go with it.
CONFIG = web.AppKey("config", ConfigFollower)


def create_app(
    settings: WarehouseSettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings | None = None,
    exit_on_death: bool = False,
) -> web.Application:
    """The sink process's app: the sink runs from startup to cleanup.

    `transforms`: the modules config records may name transforms from (None: none).
    `exit_on_death`: stop the app when the sink's loop dies (the process does; an app
    embedded elsewhere only turns not ready).
    """
    app = web.Application()
    app[METRICS] = SinkMetrics()
    # The token exists before the port opens, so `sluice sql` can read it once /health answers.
    app[QUERY] = QueryEndpoint(settings, ensure_token(settings))
    app[WATCHDOG] = StallWatchdog("sink", settings.stall_after_s, app[METRICS].registry)
    app[DEATH] = []

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def died(reason: str) -> None:
            # From the sink's thread: stop serving (a dead loop behind a green /health
            # would load nothing); `run` then exits with status 1.
            app[DEATH].append(reason)
            if exit_on_death:
                loop.call_soon_threadsafe(graceful_exit)

        warehouse = await loop.run_in_executor(None, Warehouse, settings)
        targets = sink_targets(cfg, Topics(kafka.topic_prefix), settings)
        sink = WarehouseSink(
            warehouse,
            targets,
            kafka,
            settings,
            event_codec(logical_types=False),
            app[METRICS],
            app[WATCHDOG],
            died,
        )
        await loop.run_in_executor(None, sink.start)
        app[WAREHOUSE], app[SINK] = warehouse, sink
        app[QUERY].warehouse = warehouse
        follower = ConfigFollower(
            kafka,
            cfg,
            lambda new: sink.update_targets(
                sink_targets(new, Topics(kafka.topic_prefix), settings)
            ),
            transforms,
            app[METRICS].registry,
        )
        app[CONFIG] = follower
        follower.start()
        log.info("sink started", targets=[t.topic for t in targets], dsn=settings.dsn)
        yield
        await loop.run_in_executor(None, follower.stop)
        await loop.run_in_executor(None, sink.stop)
        await loop.run_in_executor(None, warehouse.close)
        log.info("sink stopped")

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/query", app[QUERY].handle)
    _probes(app).add_routes(app)
    return app


def _probes(app: web.Application) -> Probes:
    """`/health` answers while the process serves and follows the config topic; `/ready` is
    503 with the reason when the sink's loop died or it is stalled, or while the config
    topic cannot be read (or has not been read to its end yet)."""

    def following() -> Probe:
        return app[CONFIG].failure()

    def ready() -> Probe:
        return joined(app[WATCHDOG].problem(), app[CONFIG].problem())

    return Probes(app[METRICS].registry, health=following, ready=ready)


def run(
    settings: WarehouseSettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings,
) -> None:
    """Serve until SIGTERM/SIGINT, then flush and commit what is open.

    A sink whose loop died ends the process with status 1, after logging why.
    """
    app = create_app(settings, kafka, cfg, transforms, exit_on_death=True)
    run_app(app, settings.query_host, settings.query_port)
    if app[DEATH]:
        log.error("sink exits: its loop died", reason=app[DEATH][0])
        raise SystemExit(1)
