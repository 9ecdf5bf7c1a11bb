"""The jobs API: submitting (`POST /v1/jobs`, `POST /v1/jobs/batch`) and status.

A submit key (a queue's `submit_keys`, sent as `Authorization: Bearer <key>`) names the
queues it may submit to; event write keys never do. A request is checked whole before
anything is produced: one invalid job in a batch fails the batch with its index and the
reason (400), an unknown queue is 404, a queue the key may not use 403, a payload over
the queue's `max_payload_bytes` 413. Valid jobs are produced to their queue's topic of
their priority (`sluice.jobs.<queue>.p<priority>`), keyed by their ordering key or
their id, and the answer (202, with the ids) comes once Kafka confirmed every one.

A job's id is random, or, with an idempotency key, derived from the queue and the key
(`uuid5`): every gateway gives the same key on the same queue the same id, so whatever
takes the jobs off the topic sees one job however often it was submitted.

Status comes from the job status topic, which the gateway follows: `GET /v1/jobs/{id}`
answers a job's latest state with its history (404 for a job no worker has read yet, or
of a queue the key may not use), `GET /v1/jobs?queue=&state=&limit=` lists a queue's
jobs, the latest updated first, `GET /v1/queues/{queue}` gives a queue's figures (its
jobs by state, the ones in flight, rates over the last minute and wait and run time
percentiles of recent attempts: `core.job_stats`), `GET /v1/queues` those of every queue
the key may use, and `DELETE /v1/jobs/{id}` cancels a job that is not finished (a running attempt is ended).
All of them take the queue's submit key; before the status topic was read to its end
they answer 503.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.config import MAX_PRIORITY
from core.errors import BrokerUnavailable, SchemaError, TopicError
from core.jobs import ACTIVE, CANCEL, CANCELLED, STATES, idempotent_id
from core.kafka import Record
from gateway.app_keys import (
    JOB_CODEC,
    JOB_KEYS,
    JOB_STATUS,
    METRICS,
    PRODUCER,
    TOPICS,
    JobStatuses,
)
from gateway.auth import bearer_token
from gateway.ingest import _parse, read_body
from gateway.responses import error, json_response

MAX_BATCH = 1000
# A delay or run_at further out than this is refused: almost surely a unit mistake.
MAX_DELAY_MS = 366 * 86400 * 1000
_Text = Annotated[str, Field(min_length=1, max_length=256)]


class JobRequest(BaseModel):
    """One job as a client submits it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: Annotated[str, Field(min_length=1, max_length=64)]
    payload: Any = None
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY, strict=True)
    delay_ms: int | None = Field(default=None, ge=0, le=MAX_DELAY_MS, strict=True)
    run_at: datetime | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=1000, strict=True)
    timeout_ms: int | None = Field(default=None, ge=1, le=7 * 86400 * 1000, strict=True)
    idempotency_key: _Text | None = None
    ordering_key: _Text | None = None
    tags: Annotated[tuple[Annotated[str, Field(max_length=64)], ...], Field(max_length=20)] = ()

    @model_validator(mode="after")
    def _one_start(self) -> JobRequest:
        if self.delay_ms is not None and self.run_at is not None:
            raise ValueError("give delay_ms or run_at, not both")
        if self.run_at is not None and self.run_at.tzinfo is None:
            raise ValueError("run_at needs a time zone (for example 2026-12-03T10:00:00Z)")
        return self


def job_id(queue: str, idempotency_key: str | None) -> str:
    """A new random id, or the one id of `idempotency_key` on `queue`."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return idempotent_id(queue, idempotency_key)


def _allowed(request: web.Request) -> frozenset[str]:
    queues = request.app[JOB_KEYS].queues_for(bearer_token(request.headers.get("Authorization")))
    if queues is None:
        raise error(
            401, "unknown or missing submit key", **{"WWW-Authenticate": 'Bearer realm="sluice"'}
        )
    return queues


def _check(request: web.Request, allowed: frozenset[str], item: Any, where: str) -> JobRequest:
    """One job of the request, valid for its queue, or the 4xx that says why not."""
    try:
        job = JobRequest.model_validate(item)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(job)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise error(400, f"{where}: {reasons}") from None
    queue = request.app[JOB_KEYS].queue(job.queue)
    if queue is None:
        raise error(404, f"{where}: no queue named {job.queue!r}")
    if job.queue not in allowed:
        raise error(403, f"{where}: this key may not submit to queue {job.queue!r}")
    if job.priority >= queue.priorities:
        raise error(
            400,
            f"{where}: priority {job.priority} is out of range for queue {job.queue!r} "
            f"(0 to {queue.priorities - 1})",
        )
    size = len(orjson.dumps(job.payload))
    if size > queue.max_payload_bytes:
        raise error(
            413,
            f"{where}: payload is {size} bytes, over queue {job.queue!r}'s limit of "
            f"{queue.max_payload_bytes}",
        )
    return job


def _record(request: web.Request, job: JobRequest, now_ms: int) -> tuple[str, str, Record, str]:
    """The job's id, topic, record and first state."""
    jid = job_id(job.queue, job.idempotency_key)
    run_at: int | None = None
    if job.delay_ms:
        run_at = now_ms + job.delay_ms
    elif job.run_at is not None:
        run_at = int(job.run_at.timestamp() * 1000)
        if run_at - now_ms > MAX_DELAY_MS:
            raise error(400, "run_at is more than a year away")
    value = request.app[JOB_CODEC].encode(
        {
            "job_id": jid,
            "queue": job.queue,
            "priority": job.priority,
            "payload": orjson.dumps(job.payload).decode(),
            "submitted_at": now_ms,
            "run_at": run_at,
            "max_attempts": job.max_attempts,
            "timeout_ms": job.timeout_ms,
            "idempotency_key": job.idempotency_key,
            "ordering_key": job.ordering_key,
            "tags": list(job.tags),
        }
    )
    topic = request.app[TOPICS].queue(job.queue).priority(job.priority)
    key = (job.ordering_key or jid).encode()
    state = "SCHEDULED" if run_at is not None and run_at > now_ms else "PENDING"
    return jid, topic, (key, value, None), state


async def _submit(request: web.Request, jobs: list[JobRequest]) -> list[dict[str, str]]:
    now_ms = int(time.time() * 1000)
    built = [_record(request, job, now_ms) for job in jobs]
    by_topic: dict[str, list[Record]] = {}
    for _, topic, record, _ in built:
        by_topic.setdefault(topic, []).append(record)
    try:
        for topic, records in by_topic.items():
            await request.app[PRODUCER].send_batch(topic, records)
    except (BrokerUnavailable, SchemaError) as exc:
        # Some jobs may have landed: a client sending the request again with idempotency
        # keys gets the same ids.
        raise error(503, f"jobs not stored: {exc}", **{"Retry-After": "1"}) from None
    enqueued = request.app[METRICS].jobs_enqueued
    for job in jobs:
        enqueued.labels(job.queue).inc()
    return [
        {"id": jid, "queue": job.queue, "state": state}
        for job, (jid, _, _, state) in zip(jobs, built, strict=True)
    ]


async def handle_submit(request: web.Request) -> web.Response:
    """`POST /v1/jobs`: one job; 202 with its id once Kafka confirmed it."""
    allowed = _allowed(request)
    body = _parse(request, await read_body(request))
    if not isinstance(body, dict):
        raise error(400, "the body must be a JSON object (one job)")
    job = _check(request, allowed, body, "job")
    (submitted,) = await _submit(request, [job])
    return json_response(submitted, status=202)


async def handle_submit_batch(request: web.Request) -> web.Response:
    """`POST /v1/jobs/batch`: `{"jobs": [...]}`, all valid or none stored; 202 with the ids."""
    allowed = _allowed(request)
    body = _parse(request, await read_body(request))
    items = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise error(400, 'the body must be {"jobs": [...]} with at least one job')
    if len(items) > MAX_BATCH:
        raise error(413, f"{len(items)} jobs in one request, over the limit of {MAX_BATCH}")
    jobs = [_check(request, allowed, item, f"jobs[{i}]") for i, item in enumerate(items)]
    return json_response({"jobs": await _submit(request, jobs)}, status=202)


def _statuses(request: web.Request) -> JobStatuses:
    statuses = request.app[JOB_STATUS]
    if not statuses.follower.caught_up:
        raise error(
            503,
            "job statuses are not read to their end yet: "
            + (statuses.follower.problem() or "reading"),
            **{"Retry-After": "1"},
        )
    return statuses


def _visible_queue(request: web.Request, allowed: frozenset[str], name: str) -> None:
    if request.app[JOB_KEYS].queue(name) is None:
        raise error(404, f"no queue named {name!r}")
    if name not in allowed:
        raise error(403, f"this key may not use queue {name!r}")


async def handle_status(request: web.Request) -> web.Response:
    """`GET /v1/jobs/{id}`: the job's latest state and its history."""
    allowed = _allowed(request)
    job_id = request.match_info["id"]
    status = _statuses(request).table.get(job_id)
    if status is None or status.queue not in allowed:
        raise error(404, f"no job {job_id!r} (a job shows once a worker has read it)")
    return json_response(status.public())


async def handle_list(request: web.Request) -> web.Response:
    """`GET /v1/jobs?queue=&state=&limit=`: a queue's jobs, the latest updated first."""
    allowed = _allowed(request)
    queue = request.query.get("queue")
    if not queue:
        raise error(400, "give the queue: ?queue=<name>")
    _visible_queue(request, allowed, queue)
    state = request.query.get("state")
    if state is not None and state.upper() not in STATES:
        raise error(400, f"unknown state {state!r}; one of {', '.join(STATES)}")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise error(400, "limit must be a whole number") from None
    if not 1 <= limit <= MAX_BATCH:
        raise error(400, f"limit must be 1 to {MAX_BATCH}")
    found = _statuses(request).table.select(queue, state.upper() if state else None, limit)
    return json_response({"jobs": [s.public() for s in found]})


def _figures(statuses: JobStatuses, queue: str) -> dict[str, Any]:
    """A queue's figures: jobs by state, in flight, rates and latency percentiles."""
    counts = statuses.table.counts(queue)
    return {"queue": queue, "counts": counts, "in_flight": counts[ACTIVE]} | (
        statuses.figures.summary(queue)
    )


async def handle_queue(request: web.Request) -> web.Response:
    """`GET /v1/queues/{queue}`: the queue's jobs by state, in flight, rates, latencies."""
    allowed = _allowed(request)
    queue = request.match_info["queue"]
    _visible_queue(request, allowed, queue)
    return json_response(_figures(_statuses(request), queue))


async def handle_queues(request: web.Request) -> web.Response:
    """`GET /v1/queues`: the figures of every queue the key may use, by name."""
    allowed = _allowed(request)
    statuses = _statuses(request)
    keys = request.app[JOB_KEYS]
    names = sorted(name for name in allowed if keys.queue(name) is not None)
    return json_response({"queues": [_figures(statuses, name) for name in names]})


def _stats(figures: dict[str, Any]) -> dict[str, Any]:
    """A queue's figures as `GET /v1/stats` gives them: depth, throughput, success and
    failure rates (attempts ended over the window) and processing times."""
    counts, rates = figures["counts"], figures["rates"]
    ended = rates["completed"] + rates["failed"] + rates["dead"]
    return {
        "queue": figures["queue"],
        "depth": {
            "waiting": counts["PENDING"] + counts["SCHEDULED"] + counts["FAILED"],
            "scheduled": counts["SCHEDULED"],
            "running": counts[ACTIVE],
            "dead": counts["DEAD"],
        },
        "throughput_per_s": rates["completed"],
        "success_rate": round(rates["completed"] / ended, 4) if ended else None,
        "failure_rate": round((rates["failed"] + rates["dead"]) / ended, 4) if ended else None,
        "processing_ms": figures["latency"]["run_ms"],
        "wait_ms": figures["latency"]["wait_ms"],
        "window_s": rates["window_s"],
    }


async def handle_stats(request: web.Request) -> web.Response:
    """`GET /v1/stats`: per queue the key may use, its depth, throughput, success and
    failure rates and processing times (over the last minute)."""
    allowed = _allowed(request)
    statuses = _statuses(request)
    keys = request.app[JOB_KEYS]
    names = sorted(name for name in allowed if keys.queue(name) is not None)
    return json_response({"queues": [_stats(_figures(statuses, name)) for name in names]})


# How long `DELETE /v1/jobs/{id}` waits for the job's worker to answer the cancel.
CANCEL_WAIT_S = 10.0


async def handle_cancel(request: web.Request) -> web.Response:
    """`DELETE /v1/jobs/{id}[?queue=]`: cancel a job that is not finished.

    The request goes to every partition of the queue's topics; the worker that has the
    job writes CANCELLED (200 with the status): a job that waits never runs, a running
    attempt is ended (a command's process group gets SIGTERM, then SIGKILL after its
    grace; a leased attempt's ack gets 409) and not retried. 409 when the job finished
    first; 202 when no worker answered within CANCEL_WAIT_S (it cancels the job when it
    reads the request).
    The queue comes from the job's status, or `?queue=` for a job no worker read yet.
    """
    allowed = _allowed(request)
    job_id = request.match_info["id"]
    table = _statuses(request).table
    status = table.get(job_id)
    if status is not None and status.queue not in allowed:
        status = None
    name = status.queue if status is not None else request.query.get("queue")
    if name is None:
        raise error(404, f"no job {job_id!r} (for a job no worker has read yet, add ?queue=)")
    _visible_queue(request, allowed, name)
    if status is not None and status.finished:
        raise error(409, f"the job is {status.state} already")
    queue = request.app[JOB_KEYS].queue(name)
    assert queue is not None
    topics = request.app[TOPICS].queue(name)
    producer = request.app[PRODUCER]
    loop = asyncio.get_running_loop()
    marker: Record = (job_id.encode(), None, [(CANCEL, job_id.encode())])
    try:
        for level in range(queue.priorities):
            topic = topics.priority(level)
            for partition in await loop.run_in_executor(None, producer.partitions, topic):
                await producer.send_batch(topic, [marker], partition)
    except (BrokerUnavailable, TopicError) as exc:
        raise error(503, f"cancel not sent: {exc}", **{"Retry-After": "1"}) from None
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        now = table.get(job_id)
        if now is not None and now.state == CANCELLED:
            return json_response(now.public())
        if now is not None and now.finished:
            raise error(409, f"the job is {now.state} already")
        await asyncio.sleep(0.05)
    # No worker answered (none runs, or it has not read that far): the request waits on the
    # queue's topics, behind the job, for the worker that reads it.
    return json_response({"id": job_id, "queue": name, "state": "CANCELLING"}, status=202)


def add_routes(app: web.Application) -> None:
    """Register the jobs API's routes."""
    app.router.add_post("/v1/jobs", handle_submit)
    app.router.add_post("/v1/jobs/batch", handle_submit_batch)
    app.router.add_get("/v1/jobs", handle_list)
    app.router.add_get("/v1/jobs/{id}", handle_status)
    app.router.add_delete("/v1/jobs/{id}", handle_cancel)
    app.router.add_get("/v1/queues", handle_queues)
    app.router.add_get("/v1/stats", handle_stats)
    app.router.add_get("/v1/queues/{queue}", handle_queue)
