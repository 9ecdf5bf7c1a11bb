"""The sink process: owns the warehouse, runs the warehouse sink, answers read-only queries.

In embedded mode no other process may open the warehouse folder, so `sluice sql` sends
its statement here (127.0.0.1 by default) instead of opening the folder itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from connectors.clickhouse import QueryRefused, Warehouse
from connectors.sink import SinkMetrics, SinkTarget, WarehouseSink
from ops.config import ClickHouseConfig, PipelineConfig
from ops.live import ConfigFollower
from ops.settings import KafkaSettings, TransformSettings, WarehouseSettings
from ops.topics import Topics
from schemas.codec import event_codec

log = structlog.get_logger("sluice.sink")

WAREHOUSE = web.AppKey("warehouse", Warehouse)
SINK = web.AppKey("sink", WarehouseSink)
METRICS = web.AppKey("metrics", SinkMetrics)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)


async def handle_query(request: web.Request) -> web.Response:
    """`POST /query {"sql": "..."}`: columns and rows of one read-only statement."""
    try:
        body = orjson.loads(await request.read())
        sql = body["sql"]
        if not isinstance(sql, str):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _json({"error": 'body must be {"sql": "..."}'}, 400)
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(None, request.app[WAREHOUSE].query, sql)
    except QueryRefused as exc:
        return _json({"error": str(exc)}, 400)
    except Exception as exc:
        return _json({"error": str(exc).splitlines()[0] if str(exc) else repr(exc)}, 400)
    return _json({"columns": result.columns, "rows": result.rows}, 200)


def _json(body: dict[str, Any], status: int) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=_default), status=status, content_type="application/json"
    )


async def handle_health(_request: web.Request) -> web.Response:
    """`GET /health`."""
    return _json({"status": "ok"}, 200)


async def handle_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: the sink's Prometheus metrics."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def sink_targets(
    cfg: PipelineConfig, topics: Topics, settings: WarehouseSettings
) -> list[SinkTarget]:
    """One target per ClickHouse destination: its topic and table (`settings.table` by default)."""
    targets = []
    for dest in cfg.destinations:
        connector = dest.connector()
        if isinstance(connector, ClickHouseConfig):
            table = str(dest.settings.get("table", settings.table))
            targets.append(
                SinkTarget(dest.id, topics.destination(dest.id).main, table, connector.layout)
            )
    return targets


def create_app(
    settings: WarehouseSettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings | None = None,
) -> web.Application:
    """The sink process's app: the sink runs from startup to cleanup.

    `transforms`: the modules config records may name transforms from (None: none).
    """
    app = web.Application()
    app[METRICS] = SinkMetrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        warehouse = await loop.run_in_executor(None, Warehouse, settings)
        targets = sink_targets(cfg, Topics(kafka.topic_prefix), settings)
        sink = WarehouseSink(
            warehouse, targets, kafka, settings, event_codec(logical_types=False), app[METRICS]
        )
        await loop.run_in_executor(None, sink.start)
        app[WAREHOUSE], app[SINK] = warehouse, sink
        follower = ConfigFollower(
            kafka,
            cfg,
            lambda new: sink.update_targets(
                sink_targets(new, Topics(kafka.topic_prefix), settings)
            ),
            transforms,
            app[METRICS].registry,
        )
        follower.start()
        log.info("sink started", targets=[t.topic for t in targets], dsn=settings.dsn)
        yield
        await loop.run_in_executor(None, follower.stop)
        await loop.run_in_executor(None, sink.stop)
        await loop.run_in_executor(None, warehouse.close)
        log.info("sink stopped")

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/query", handle_query)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app


def run(
    settings: WarehouseSettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings,
) -> None:
    """Serve until SIGTERM/SIGINT, then flush and commit what is open."""
    web.run_app(
        create_app(settings, kafka, cfg, transforms),
        host=settings.query_host,
        port=settings.query_port,
        access_log=None,
        print=lambda *_: None,
    )
