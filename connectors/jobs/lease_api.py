"""The lease API of the job worker process: HTTP workers take jobs and finish them.

On the job worker's port (`SLUICE_JOBS_PORT`), with a submit key of the queue as the
Bearer token (the key that may submit to a queue may also work it):

- `POST /v1/queues/{q}/lease` `{max_jobs, visibility_ms, wait_ms}`: up to `max_jobs`
  (1-100, default 1) jobs, each under a lease of `visibility_ms` (default the queue's
  `lease_s`; at most its executor's `max_visibility_s`); with none ready, waits up to
  `wait_ms` (0-20,000) for one. `200 {"jobs": [...]}`, each with `id`, `lease_id`,
  `lease_until_ms`, `attempt`, `payload`, ...
- `POST /v1/jobs/{id}/ack` `{lease_id, result}`: the attempt completed (`200` and the
  status, once it is written).
- `POST /v1/jobs/{id}/nack` `{lease_id, error, fatal}`: the attempt failed; retried with
  the queue's backoff, or DEAD when `fatal` or its attempts are spent.
- `POST /v1/jobs/{id}/extend` `{lease_id, visibility_ms, progress}`: the lease ends
  `visibility_ms` from now; `progress` (any JSON) goes into the status.

A lease id that is not the job's current lease (it ended, the job was acked or nacked,
another worker holds the job now) gets `409`; the same ack sent again after it was
taken gets `200` and the status. A lease is held by the process that gave it; a call
that reaches another process of the queue's group is sent on through the job's
partition (a record with the `LEASE_CALL` header), whose owner holds the lease, and is
answered when the status shows its effect, so HTTP workers may call any process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from connectors.jobs.leases import MAX_PROGRESS_BYTES, MAX_RESULT_BYTES, FatalNack, Nacked
from connectors.jobs.worker import QueueWorker
from core.config import LeaseExecutor, PipelineConfig, Queue
from core.jobs import ACTIVE, COMPLETED, DEAD, FAILED, JobStatus, cut
from core.keys import SubmitKeys, bearer_token
from core.responses import error, json_response

MAX_JOBS = 100
MAX_WAIT_MS = 20_000
# A lease request or an outcome is small: a result bigger than this is refused.
MAX_BODY_BYTES = 1024 * 1024


class LeaseDesk:
    """What the routes need: the submit keys and the running lease queues' loops."""

    def __init__(self, cfg: PipelineConfig, running: dict[str, QueueWorker]) -> None:
        self.keys = SubmitKeys(cfg)
        self.running = running

    def update(self, cfg: PipelineConfig) -> None:
        """Use `cfg`'s keys from now on."""
        self.keys = SubmitKeys(cfg)


DESK = web.AppKey("lease_desk", LeaseDesk)


def _allowed(request: web.Request) -> frozenset[str]:
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise error(401, "send a submit key of the queue: Authorization: Bearer <key>")
    allowed = request.app[DESK].keys.queues_for(token)
    if allowed is None:
        raise error(401, "unknown submit key")
    return allowed


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise error(413, f"the body is over {MAX_BODY_BYTES} bytes")
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise error(413, f"the body is over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise error(400, "the body must be a JSON object")
    return body


def _int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(400, f"{name} must be a whole number")
    if not low <= value <= high:
        raise error(400, f"{name} must be {low} to {high}")
    return value


def _lease_queue(request: web.Request, allowed: frozenset[str], name: str) -> QueueWorker:
    desk = request.app[DESK]
    queue = desk.keys.queue(name)
    if queue is None:
        raise error(404, f"no queue named {name!r}")
    if name not in allowed:
        raise error(403, f"this key may not use queue {name!r}")
    if not isinstance(queue.executor, LeaseExecutor):
        raise error(409, f"queue {name!r} is not leased over HTTP (its executor runs its jobs)")
    worker = desk.running.get(name)
    if worker is None:
        raise error(
            503, f"queue {name!r} is not worked by this process yet", **{"Retry-After": "1"}
        )
    return worker


def _visibility_ms(body: dict[str, Any], queue: Queue) -> int:
    assert isinstance(queue.executor, LeaseExecutor)
    longest = int(queue.executor.max_visibility_s * 1000)
    return _int(body, "visibility_ms", min(longest, int(queue.lease_s * 1000)), 1, longest)


def _job(status: JobStatus, payload: Any) -> dict[str, Any]:
    return {
        "id": status.id,
        "queue": status.queue,
        "lease_id": status.lease_id,
        "lease_until_ms": status.lease_until_ms,
        "attempt": status.attempt,
        "max_attempts": status.max_attempts,
        "priority": status.priority,
        "ordering_key": status.ordering_key,
        "tags": list(status.tags),
        "submitted_at_ms": status.submitted_at_ms,
        "worker": status.worker,
        "payload": payload,
    }


async def handle_lease(request: web.Request) -> web.Response:
    """`POST /v1/queues/{q}/lease`: jobs under leases."""
    allowed = _allowed(request)
    worker = _lease_queue(request, allowed, request.match_info["queue"])
    body = await _body(request)
    max_jobs = _int(body, "max_jobs", 1, 1, MAX_JOBS)
    visibility = _visibility_ms(body, worker.queue)
    wait_ms = _int(body, "wait_ms", 0, 0, MAX_WAIT_MS)
    leased = await worker.lease(max_jobs, visibility, wait_ms / 1000)
    return json_response({"jobs": [_job(status, payload) for status, payload in leased]})


async def _find(request: web.Request, allowed: frozenset[str]) -> tuple[str, QueueWorker]:
    """The job id and the loop of its queue (or an error)."""
    job_id = request.match_info["id"]
    desk = request.app[DESK]
    if not desk.running:
        raise error(404, f"no job {job_id!r}")
    # Every loop follows the whole status topic: any table knows the job, once it has
    # read what another process wrote about it just now.
    first = next(iter(desk.running.values()))
    status = first.table.get(job_id)
    if status is None:
        await first.catch_up()
        status = first.table.get(job_id)
    if status is None or status.queue not in allowed:
        raise error(404, f"no job {job_id!r}")
    worker = desk.running.get(status.queue)
    if worker is None or not isinstance(worker.queue.executor, LeaseExecutor):
        raise error(409, f"job {job_id!r} is not leased from this process")
    return job_id, worker


def _bounded(body: dict[str, Any], name: str, limit: int) -> Any:
    """`body[name]`, refused (413) when its JSON is over `limit` bytes."""
    value = body.get(name)
    if value is not None and len(orjson.dumps(value)) > limit:
        raise error(413, f"{name} is over {limit} bytes as JSON")
    return value


def _lease_id(body: dict[str, Any]) -> str:
    lease_id = body.get("lease_id")
    if not isinstance(lease_id, str) or not lease_id:
        raise error(400, 'give the lease: {"lease_id": "..."}')
    return lease_id


async def _held_elsewhere(worker: QueueWorker, job_id: str, lease_id: str) -> JobStatus | None:
    """The job's status when the lease is current and held by another job worker process."""
    status = worker.table.get(job_id)
    if status is None or status.lease_id != lease_id:
        await worker.catch_up()  # a lease given out elsewhere a moment ago
        status = worker.table.get(job_id)
    if (
        status is not None
        and status.state == ACTIVE
        and status.lease_id == lease_id
        and status.worker != worker.worker_id
        and (status.lease_until_ms or 0) > time.time() * 1000
    ):
        return status
    return None


def _stale(lease_id: str) -> web.HTTPException:
    return error(
        409,
        f"lease {lease_id} is not the job's current lease (it ended, or the attempt was"
        " acked or nacked, or another worker has the job now)",
    )


# How long a lease call sent on to the process holding the lease waits for its effect.
FORWARD_WAIT_S = 10.0


async def _forwarded(
    worker: QueueWorker, held: JobStatus, call: dict[str, Any], done: Callable[[JobStatus], bool]
) -> JobStatus:
    """Send `call` to the process holding the lease (through the job's partition) and wait
    until the status shows it took effect (`done`), or fail: 409 when the lease ended
    meanwhile, 503 when nothing answered."""
    await worker.forward(held, call)
    deadline = time.monotonic() + FORWARD_WAIT_S
    while time.monotonic() < deadline:
        now = worker.table.get(held.id)
        if now is not None and done(now):
            return now
        if now is not None and (now.attempt != held.attempt or now.state != ACTIVE):
            raise _stale(str(call["lease_id"]))  # the attempt ended otherwise
        await asyncio.sleep(0.02)
    raise error(
        503,
        f"the job worker holding the lease ({held.worker}) did not answer within"
        f" {FORWARD_WAIT_S:g} s",
        **{"Retry-After": "1"},
    )


def _ended_by(attempt: int, states: frozenset[str]) -> Callable[[JobStatus], bool]:
    """Whether a status shows attempt `attempt` (held by the lease) ended in one of
    `states` other than by the lease's end (the next attempt may be on already)."""

    def check(status: JobStatus) -> bool:
        return any(
            h.get("state") in states and h.get("attempt") == attempt and h.get("note") is None
            for h in status.history
        )

    return check


async def _outcome(request: web.Request, what: str) -> web.Response:
    allowed = _allowed(request)
    job_id, worker = await _find(request, allowed)
    body = await _body(request)
    lease_id = _lease_id(body)
    fatal = body.get("fatal", False)
    if not isinstance(fatal, bool):
        raise error(400, "fatal must be true or false")
    message = body.get("error")
    reason = cut(str(message)) if message is not None else "nacked by its worker"
    result = _bounded(body, "result", MAX_RESULT_BYTES) if what == "ack" else None
    lease = worker.running_lease(job_id, lease_id)
    if lease is None:
        status = worker.table.get(job_id)
        if (
            what == "ack"
            and status is not None
            and status.state == COMPLETED
            and status.lease_id == lease_id
        ):
            return json_response(status.public())  # the same ack again
        held = await _held_elsewhere(worker, job_id, lease_id)
        if held is None:
            raise _stale(lease_id)
        if what == "ack":
            call = {"op": "ack", "lease_id": lease_id, "result": result}
            done = _ended_by(held.attempt, frozenset({COMPLETED}))
        else:
            call = {"op": "nack", "lease_id": lease_id, "error": reason, "fatal": fatal}
            done = _ended_by(held.attempt, frozenset({FAILED, DEAD}))
        return json_response((await _forwarded(worker, held, call, done)).public())
    if what == "ack":
        written = await worker.finish(lease, result)
    else:
        written = await worker.finish(lease, FatalNack(reason) if fatal else Nacked(reason))
    return json_response(written.public())


async def handle_ack(request: web.Request) -> web.Response:
    """`POST /v1/jobs/{id}/ack`: the leased attempt completed."""
    return await _outcome(request, "ack")


async def handle_nack(request: web.Request) -> web.Response:
    """`POST /v1/jobs/{id}/nack`: the leased attempt failed."""
    return await _outcome(request, "nack")


async def handle_extend(request: web.Request) -> web.Response:
    """`POST /v1/jobs/{id}/extend`: more time for the leased attempt."""
    allowed = _allowed(request)
    job_id, worker = await _find(request, allowed)
    body = await _body(request)
    lease_id = _lease_id(body)
    visibility = _visibility_ms(body, worker.queue)
    progress = _bounded(body, "progress", MAX_PROGRESS_BYTES)
    lease = worker.running_lease(job_id, lease_id)
    if lease is None:
        held = await _held_elsewhere(worker, job_id, lease_id)
        if held is None:
            raise _stale(lease_id)
        call = {
            "op": "extend",
            "lease_id": lease_id,
            "visibility_ms": visibility,
            "progress": progress,
        }

        def extended_to(status: JobStatus) -> bool:
            # The holder moved the lease's end (to its now + visibility_ms).
            return (
                status.state == ACTIVE
                and status.lease_id == lease_id
                and status.lease_until_ms != held.lease_until_ms
            )

        return json_response((await _forwarded(worker, held, call, extended_to)).public())
    extended = worker.extend(lease, visibility, progress)
    return json_response(extended.public())


def add_routes(app: web.Application) -> None:
    """The lease API's routes."""
    app.router.add_post("/v1/queues/{queue}/lease", handle_lease)
    app.router.add_post("/v1/jobs/{id}/ack", handle_ack)
    app.router.add_post("/v1/jobs/{id}/nack", handle_nack)
    app.router.add_post("/v1/jobs/{id}/extend", handle_extend)
