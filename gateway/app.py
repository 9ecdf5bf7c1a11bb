"""The gateway's aiohttp application: the ingest API, its resources, and the probes.

`create_app` assembles it (middleware, routes, the producer and the config follower as
cleanup contexts, `/health`, `/ready` and `/metrics` from the process shell); `run`
serves it with bounded connections (`gateway.connections`) until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import gc

import structlog
from aiohttp import web

from core.config import PipelineConfig
from core.keys import RunKeys
from core.settings import GatewaySettings, KafkaSettings, TransformSettings
from core.shell import Probe, Probes, joined
from core.topics import Topics
from gateway import ingest, jobs, workflows
from gateway.app_keys import (
    CODEC,
    CONFIG,
    FAST,
    JOB_CODEC,
    JOB_KEYS,
    JOB_STATUS,
    METRICS,
    PRODUCER,
    RUN_KEYS,
    SETTINGS,
    SOURCES,
    TOPICS,
)
from gateway.auth import SourceTable, SubmitKeys
from gateway.connections import serve
from gateway.contexts import config_ctx, job_status_ctx, producer_ctx
from gateway.fast_envelope import FastWriter
from gateway.metrics import GatewayMetrics
from gateway.middleware import observe
from gateway.openapi import openapi_document
from gateway.responses import json_response
from schemas.codec import event_codec, job_codec

log = structlog.get_logger("sluice.gateway")


async def handle_openapi(_request: web.Request) -> web.Response:
    """`GET /openapi.json`: the API description."""
    return json_response(openapi_document())


def _probes(app: web.Application) -> Probes:
    """`/health`: the process is up and follows the config topic; `/ready`: the broker
    answers, the config topic has been read to its end (new write keys are known) and so
    has the job status topic (the jobs API answers from it)."""

    def following() -> Probe:
        return app[CONFIG].failure()

    async def ready() -> Probe:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, app[PRODUCER].reachable)
        statuses = app.get(JOB_STATUS)
        jobs = statuses.follower.problem() if statuses is not None else None
        runs = app[workflows.WORKFLOWS].problem() if workflows.WORKFLOWS in app else None
        return joined(None if ok else "broker unreachable", app[CONFIG].problem(), jobs, runs)

    return Probes(app[METRICS].registry, health=following, ready=ready)


def create_app(
    settings: GatewaySettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings | None = None,
) -> web.Application:
    """The gateway app; the producer opens with the app and flushes when it closes.

    `transforms`: the modules config records may name transforms from (None: none).
    """
    app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[observe])
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    app[SOURCES] = SourceTable(cfg)
    app[JOB_KEYS] = SubmitKeys(cfg)
    app[RUN_KEYS] = RunKeys(cfg)
    app[JOB_CODEC] = job_codec()
    app[CODEC] = event_codec()
    app[TOPICS] = Topics(kafka.topic_prefix)
    app[FAST] = FastWriter(app[CODEC], settings.max_event_bytes, settings.max_json_depth)
    app.cleanup_ctx.append(producer_ctx(kafka, settings))
    app.cleanup_ctx.append(config_ctx(kafka, cfg, transforms))
    app.cleanup_ctx.append(job_status_ctx(kafka))
    app.cleanup_ctx.append(workflows.workflows_ctx(kafka, app[RUN_KEYS]))
    ingest.add_routes(app)
    jobs.add_routes(app)
    workflows.add_routes(app)
    app.router.add_get("/openapi.json", handle_openapi)
    _probes(app).add_routes(app)
    return app


def run(
    settings: GatewaySettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings,
) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests finish and the producer flushes."""
    import uvloop  # noqa: PLC0415 - only the served process needs it

    # Start-up objects (modules, schemas, config) never become garbage: keep the
    # collector from rescanning them, and collect the young generation less often
    # (every request allocates hundreds of short-lived containers).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)

    app = create_app(settings, kafka, cfg, transforms)
    serve(app, settings, app[METRICS], uvloop.new_event_loop())
    log.info("gateway stopped")
