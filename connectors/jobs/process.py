"""The job worker process: the queues of the config whose executor runs in it.

Each enabled queue with an `executor` gets a loop (`QueueWorker`) in the consumer group
`<SLUICE_JOBS_CONSUMER_GROUP>-<queue>`; run as many processes as the queue needs, Kafka
shares the partitions. It follows the config topic: queues appear, change and go without
a restart (a queue whose settings changed is stopped, its running jobs finish, and is
started again).

`/ready` fails while a queue's loop is stalled (jobs due, none started or finished for
`SLUICE_JOBS_STALL_AFTER_S`), while its status topic has not been read to its end, once a
loop died, and while the config topic cannot be read, each under its name. A queue whose
executor cannot run (a function of a module `SLUICE_JOBS_MODULES` does not allow, or
that is not there; a program `SLUICE_JOBS_COMMANDS` does not allow) is not run and is named in `/ready` with the reason; a dead loop stops the
process with exit status 1, so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from connectors.jobs.command import CommandCall
from connectors.jobs.executor import JobCall, PythonCall
from connectors.jobs.http_call import HttpCall
from connectors.jobs.lease_api import DESK, LeaseDesk, add_routes
from connectors.jobs.metrics import JobMetrics
from connectors.jobs.worker import QueueWorker
from core.config import CommandExecutor, HttpExecutor, PipelineConfig, PythonExecutor, Queue
from core.config_topic import ConfigFollower
from core.errors import ConfigError
from core.settings import JobSettings, KafkaSettings, TransformSettings
from core.shell import Probe, Probes, run_app
from schemas.codec import job_codec

log = structlog.get_logger("sluice.jobs")

REGISTRY = web.AppKey("registry", CollectorRegistry)
CONFIG = web.AppKey("config", ConfigFollower)


class Workers:
    """The running queue loops; `apply` makes them match a config."""

    def __init__(self, kafka: KafkaSettings, settings: JobSettings, metrics: JobMetrics) -> None:
        self.kafka = kafka
        self.settings = settings
        self.metrics = metrics
        self.worker_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.running: dict[str, QueueWorker] = {}
        # Queues that are not run, with why (a function that cannot be loaded).
        self.refused: dict[str, str] = {}
        # Loops that died, with why: the process is not ready again and exits with 1.
        self.failed: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changing = asyncio.Lock()

    def _wanted(self, cfg: PipelineConfig) -> dict[str, Queue]:
        return {q.name: q for q in cfg.queues if q.enabled and q.executor is not None}

    async def apply(self, cfg: PipelineConfig) -> None:
        """Start, restart (changed) and stop queue loops to match `cfg`."""
        async with self._changing:
            wanted = self._wanted(cfg)
            gone = [
                name
                for name, running in self.running.items()
                if name not in wanted or running.queue != wanted[name]
            ]
            await self._stop(gone)
            self.refused = {n: r for n, r in self.refused.items() if n in wanted}
            for name, queue in wanted.items():
                if name in self.running:
                    continue
                try:
                    call = self._call(queue)
                except ConfigError as exc:
                    self.refused[name] = str(exc)
                    log.error("queue not run", queue=name, reason=str(exc))
                    continue
                self.refused.pop(name, None)
                worker = QueueWorker(
                    queue,
                    call,
                    self.kafka,
                    self.settings,
                    self.metrics,
                    job_codec(logical_types=False),
                    self.worker_id,
                )
                self.running[name] = worker
                task = asyncio.create_task(worker.run(), name=name)
                task.add_done_callback(self._ended)
                self._tasks[name] = task

    def _call(self, queue: Queue) -> JobCall | None:
        """What runs the queue's jobs here; None for a queue leased over HTTP (the lease
        API starts its jobs). ConfigError when the executor may not or cannot run."""
        executor = queue.executor
        if isinstance(executor, PythonExecutor):
            return PythonCall(executor.function, self.settings.allows)
        if isinstance(executor, CommandExecutor):
            return CommandCall(executor, self.settings, queue.name, self.metrics)
        if isinstance(executor, HttpExecutor):
            return HttpCall(executor, self.settings)
        return None

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (error := task.exception()) is None:
            return
        cause = error.__cause__ or error
        self.failed[task.get_name()] = f"queue loop {task.get_name()} died: {cause!r}"
        log.error("queue loop failed; stopping", queue=task.get_name(), error=repr(cause))
        os.kill(os.getpid(), signal.SIGTERM)

    def problems(self) -> dict[str, str]:
        """Why queues are not worked: refused, dead or stalled; empty when all is well."""
        found = {**self.refused, **self.failed}
        for name, worker in self.running.items():
            if name not in found and (problem := worker.problem()) is not None:
                found[name] = problem
        return found

    async def stop(self) -> None:
        """Stop every loop: running jobs finish, what is done is committed."""
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
                log.error("queue loop failed", queue=name, error=repr(result))


WORKERS = web.AppKey("workers", Workers)


def _probes(app: web.Application) -> Probes:
    workers = app[WORKERS]

    def with_config(found: dict[str, str], problem: str | None) -> Probe:
        if problem is not None:
            found[app[CONFIG].topic] = problem
        return found or None

    def alive() -> Probe:
        return with_config(dict(workers.failed), app[CONFIG].failure())

    def working() -> Probe:
        return with_config(workers.problems(), app[CONFIG].problem())

    return Probes(
        app[REGISTRY],
        alive,
        working,
        lambda: {"queues": sorted(workers.running), "worker": workers.worker_id},
    )


def create_app(
    settings: JobSettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings | None = None,
) -> web.Application:
    """The job worker's app: the queue loops run from startup to cleanup."""
    app = web.Application()
    app[REGISTRY] = CollectorRegistry()
    app[WORKERS] = Workers(kafka, settings, JobMetrics(app[REGISTRY]))
    app[DESK] = LeaseDesk(cfg, app[WORKERS].running)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        workers = app[WORKERS]
        await workers.apply(cfg)
        changes: set[asyncio.Task[None]] = set()

        def follow(new: PipelineConfig) -> None:
            app[DESK].update(new)
            change = loop.create_task(workers.apply(new))
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
        log.info("job worker started", queues=sorted(workers.running), worker=workers.worker_id)
        yield
        stopping = loop.run_in_executor(None, follower.stop)
        await asyncio.gather(*changes, return_exceptions=True)
        await workers.stop()
        await stopping
        log.info("job worker stopped")

    app.cleanup_ctx.append(lifecycle)
    _probes(app).add_routes(app)
    add_routes(app)
    return app


def run(
    settings: JobSettings,
    kafka: KafkaSettings,
    cfg: PipelineConfig,
    transforms: TransformSettings,
) -> None:
    """Serve until SIGTERM/SIGINT; running jobs finish and their offsets are committed.

    Exits with status 1 when it stopped because a queue's loop died.
    """
    app = create_app(settings, kafka, cfg, transforms)
    _tune_garbage_collector()
    run_app(app, settings.host, settings.port)
    if failed := app[WORKERS].failed:
        log.error("stopped after a queue loop died", queues=sorted(failed))
        raise SystemExit(1)


def _tune_garbage_collector() -> None:
    """Fewer and cheaper collections for a loop that allocates a few objects a job.

    What exists once the app is built (modules, the config, the app) lives as long as the
    process: frozen, later collections do not walk it. The youngest generation is
    collected every 5,000 allocations instead of 700 and the oldest at most every 100th
    time the middle one is: under load, the defaults made the full collections, each a walk
    of every object the process holds, take a quarter of the worker's time (measured with
    `sluice bench jobs`, BENCHMARKS.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(5000, 20, 100)
