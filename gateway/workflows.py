"""The workflow runs API: start, read, list and cancel runs of applied playbooks.

Every route takes a run key (`Authorization: Bearer <key>`, `workflows.run_keys` of the
config; never an event write key):

- `POST /v1/workflows/runs` `{path, version?, workload?}`: 202 with the run's id once Kafka
  confirmed its `playbook.requested` event; 404 for a path (or version) the catalog does
  not have; a run without `version` keeps the latest version at the time of the request.
- `GET /v1/workflows/runs/{id}`: the run's state from the orchestrator's table
  (`sluice.workflows.runs`): status, result, and per step its state, attempts,
  durations, result and error; 404 while the orchestrator has not written it yet.
- `GET /v1/workflows/runs?status=&path=&limit=`: the latest runs first.
- `DELETE /v1/workflows/runs/{id}`: cancel (running steps are cancelled, nothing new
  starts): 200 with the run once CANCELLED, 202 when the orchestrator has not answered
  within 2 s, 409 for a run that ended already.
- `GET /v1/workflows/playbooks`: the latest version of each applied playbook.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import BrokerUnavailable, TopicError
from core.follower import CompactedFollower, Entry
from core.keys import RunKeys, bearer_token
from core.settings import KafkaSettings
from core.topics import Topics
from core.workflows import engine
from core.workflows import events as ev
from core.workflows.catalog import Catalog
from gateway.app_keys import PRODUCER, TOPICS
from gateway.ingest import _parse, read_body
from gateway.responses import error, json_response

CANCEL_WAIT_S = 2.0
MAX_LIST = 1000


class RunTable:
    """Each run's latest summary, from the runs topic (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}

    def apply(self, entry: Entry) -> None:
        if entry.key is None:
            return
        eid = entry.key.decode()
        with self._lock:
            if entry.value is None:
                self._runs.pop(eid, None)
            else:
                self._runs[eid] = orjson.loads(entry.value)

    def get(self, eid: str) -> dict[str, Any] | None:
        with self._lock:
            return self._runs.get(eid)

    def select(self, status: str | None, path: str | None, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            runs = list(self._runs.values())
        found = [
            r
            for r in runs
            if (status is None or r.get("status") == status)
            and (path is None or r.get("path") == path)
        ]
        found.sort(key=lambda r: r.get("requested_at_ms") or 0, reverse=True)
        return found[:limit]


@dataclass
class WorkflowState:
    """What the runs API reads: the catalog and the runs table, each with its follower."""

    keys: RunKeys
    catalog: Catalog = field(default_factory=Catalog)
    runs: RunTable = field(default_factory=RunTable)
    followers: list[CompactedFollower] = field(default_factory=list)

    def problem(self) -> str | None:
        for follower in self.followers:
            problem = follower.problem()
            if problem is not None:
                return problem
        return None


WORKFLOWS = web.AppKey("workflows", WorkflowState)


class RunRequest(BaseModel):
    """`POST /v1/workflows/runs`."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=200)
    version: int | None = Field(default=None, ge=1)
    workload: dict[str, Any] = {}


def workflows_ctx(
    kafka: KafkaSettings, keys: RunKeys
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Followers of the catalog and the runs topics into the app's `WORKFLOWS`."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        topics = Topics(kafka.topic_prefix)
        state = WorkflowState(keys)
        state.followers = [
            CompactedFollower(
                kafka, topics.workflows_catalog, state.catalog.apply, name="gateway-catalog"
            ),
            CompactedFollower(
                kafka, topics.workflows_runs, state.runs.apply, name="gateway-runs", committed=True
            ),
        ]
        app[WORKFLOWS] = state
        for follower in state.followers:
            follower.start()
        yield
        for follower in state.followers:
            await loop.run_in_executor(None, follower.stop)

    return ctx


def _state(request: web.Request) -> WorkflowState:
    state = request.app[WORKFLOWS]
    if not state.keys.allows(bearer_token(request.headers.get("Authorization"))):
        raise error(
            401, "unknown or missing run key", **{"WWW-Authenticate": 'Bearer realm="sluice"'}
        )
    return state


async def _send(request: web.Request, evt: dict[str, Any]) -> None:
    topic = request.app[TOPICS].workflows_events
    try:
        await request.app[PRODUCER].send_batch(
            topic, [(evt["execution_id"].encode(), ev.encode(evt), None)]
        )
    except (BrokerUnavailable, TopicError) as exc:
        raise error(503, f"not stored: {exc}", **{"Retry-After": "1"}) from None


async def handle_start(request: web.Request) -> web.Response:
    """`POST /v1/workflows/runs`: 202 with the new run's id once Kafka confirmed it."""
    state = _state(request)
    body = _parse(request, await read_body(request))
    try:
        wanted = RunRequest.model_validate(body)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise error(400, reasons) from None
    size = len(orjson.dumps(wanted.workload))
    if size > state.keys.max_workload_bytes:
        raise error(413, f"workload is {size} bytes, over {state.keys.max_workload_bytes}")
    found = state.catalog.get(wanted.path, wanted.version)
    if found is None and state.followers:
        # Applied a moment ago, perhaps: read the catalog up to now, then look again.
        await asyncio.get_running_loop().run_in_executor(None, state.followers[0].sync, 2.0)
        found = state.catalog.get(wanted.path, wanted.version)
    if found is None:
        what = wanted.path if wanted.version is None else f"{wanted.path} version {wanted.version}"
        raise error(404, f"no playbook {what} in the catalog")
    eid = engine.new_execution_id()
    evt = ev.event(
        eid,
        ev.PLAYBOOK_REQUESTED,
        f"{eid}:requested",
        path=found.path,
        version=found.version,
        workload=wanted.workload,
    )
    await _send(request, evt)
    return json_response(
        {"id": eid, "path": found.path, "version": found.version, "status": engine.REQUESTED},
        status=202,
    )


async def handle_get(request: web.Request) -> web.Response:
    """`GET /v1/workflows/runs/{id}`."""
    state = _state(request)
    run = state.runs.get(request.match_info["id"])
    if run is None:
        raise error(404, f"no run {request.match_info['id']!r} (yet)")
    return json_response(run)


async def handle_list(request: web.Request) -> web.Response:
    """`GET /v1/workflows/runs?status=&path=&limit=`."""
    state = _state(request)
    try:
        limit = min(MAX_LIST, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        raise error(400, "limit must be a number") from None
    runs = state.runs.select(request.query.get("status"), request.query.get("path"), limit)
    return json_response({"runs": [{k: v for k, v in r.items() if k != "steps"} for r in runs]})


async def handle_cancel(request: web.Request) -> web.Response:
    """`DELETE /v1/workflows/runs/{id}`."""
    state = _state(request)
    eid = request.match_info["id"]
    run = state.runs.get(eid)
    if run is None:
        raise error(404, f"no run {eid!r} (yet)")
    if run.get("status") in engine.FINISHED:
        raise error(409, f"the run is {run['status']} already")
    await _send(request, ev.event(eid, ev.CANCEL_REQUESTED, f"{eid}:cancel"))
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        now = state.runs.get(eid)
        if now is not None and now.get("status") in engine.FINISHED:
            return json_response(now)
        await asyncio.sleep(0.05)
    return json_response({"id": eid, "status": "CANCELLING"}, status=202)


async def handle_playbooks(request: web.Request) -> web.Response:
    """`GET /v1/workflows/playbooks`."""
    state = _state(request)
    return json_response({"playbooks": [e.summary() for e in state.catalog.latest()]})


def add_routes(app: web.Application) -> None:
    """Register the workflow runs API's routes."""
    app.router.add_post("/v1/workflows/runs", handle_start)
    app.router.add_get("/v1/workflows/runs", handle_list)
    app.router.add_get("/v1/workflows/runs/{id}", handle_get)
    app.router.add_delete("/v1/workflows/runs/{id}", handle_cancel)
    app.router.add_get("/v1/workflows/playbooks", handle_playbooks)
