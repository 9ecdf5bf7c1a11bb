"""The jobs API as the jobs tests use it: a pipeline with one queue of the `ledger`
function, submits in batches, and statuses read back over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.configs import SUBMIT_KEY, Configs
from tests.pipeline import Pipeline, http_json, pipeline_with_topics

BEARER = {"Authorization": f"Bearer {SUBMIT_KEY}"}
LEDGER_FN = {"type": "python", "function": "tests.job_functions:ledger"}


def queue_pipeline(
    configs: Configs, broker: str, prefix: str, root: Path, **queue: Any
) -> Pipeline:
    fields: dict[str, Any] = {
        "priorities": 3,
        "partitions": 2,
        "executor": LEDGER_FN,
        "backoff": {"base_ms": 100, "max_ms": 400},
        "lease_s": 3,
        **queue,
    }
    config = configs.text(configs.warehouse(), queues=[configs.queue("work", **fields)])
    return pipeline_with_topics(root, broker, prefix, config)


async def submit(
    session: aiohttp.ClientSession, pipe: Pipeline, jobs: list[dict[str, Any]]
) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(jobs), 500):
        chunk = [{"queue": "work", **job} for job in jobs[start : start + 500]]
        async with session.post(
            f"{pipe.gateway_url}/v1/jobs/batch", json={"jobs": chunk}, headers=BEARER
        ) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            ids += [j["id"] for j in body["jobs"]]
    return ids


def status_of(pipe: Pipeline, job_id: str) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = http_json(f"{pipe.gateway_url}/v1/jobs/{job_id}", headers=BEARER)
    except Exception:
        return None
    return status


def states_of(pipe: Pipeline, ids: list[str]) -> dict[str, str]:
    found = {}
    for job_id in ids:
        status = status_of(pipe, job_id)
        if status is not None:
            found[job_id] = status["state"]
    return found


def all_in(pipe: Pipeline, ids: list[str], states: set[str]) -> bool:
    found = states_of(pipe, ids)
    return len(found) == len(ids) and set(found.values()) <= states
