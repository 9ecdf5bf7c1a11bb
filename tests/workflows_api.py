"""The workflow runs as the workflow tests use them: a pipeline with the orchestrator, the
workflow queue's runner and an `echo` queue, playbooks applied, runs read back over HTTP."""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from core.settings import KafkaSettings
from core.workflows import engine
from ops.cli_workflows import apply_playbook, read_events
from tests.configs import Configs
from tests.pipeline import Pipeline, http_json, pipeline_with_topics

RUN_KEY = "test-run-key"
RUN_BEARER = {"Authorization": f"Bearer {RUN_KEY}"}


def workflow_pipeline(
    configs: Configs,
    broker: str,
    prefix: str,
    root: Path,
    concurrency: int = 20,
    queues: Sequence[dict[str, Any]] = (),
    **env: str,
) -> Pipeline:
    queues = [
        *queues,
        configs.queue(
            "workflows",
            keys=(),
            priorities=1,
            partitions=2,
            concurrency=concurrency,
            max_attempts=1,
            executor={"type": "python", "function": "connectors.workflows.tools:run_step"},
        ),
        configs.queue(
            "echo",
            priorities=1,
            partitions=2,
            executor={"type": "python", "function": "connectors.jobs.builtin:echo"},
        ),
    ]
    config = configs.text(configs.warehouse(), queues=queues, workflows={"run_keys": [RUN_KEY]})
    pipe = pipeline_with_topics(root, broker, prefix, config)
    pipe.env.update(
        {
            "SLUICE_JOBS_MODULES": "tests.job_functions,connectors.jobs.builtin,"
            "connectors.workflows.tools",
            "SLUICE_WORKFLOWS_CONSUMER_GROUP": "workflows",
            "SLUICE_WORKFLOWS_INSTANCE": "test",
            **env,
        }
    )
    return pipe


def kafka_of(pipe: Pipeline) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=pipe.bootstrap, topic_prefix=pipe.prefix)


def apply(pipe: Pipeline, text: str) -> int:
    """Apply a playbook; its version."""
    entry, _ = apply_playbook(kafka_of(pipe), text)
    return entry.version


def playbook(
    path: str, workflow: list[dict[str, Any]], workload: dict[str, Any] | None = None
) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "noetl.io/v2",
            "kind": "Playbook",
            "metadata": {"name": path.rsplit("/", 1)[-1], "path": path},
            "workload": workload or {},
            "workflow": workflow,
        },
        sort_keys=False,
    )


def start_run(pipe: Pipeline, path: str, workload: dict[str, Any] | None = None) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = http_json(
                f"{pipe.gateway_url}/v1/workflows/runs",
                {"path": path, "workload": workload or {}},
                headers=RUN_BEARER,
            )
            return str(answer["id"])
        except urllib.error.HTTPError as exc:
            # The gateway reads the catalog as it is applied: a 404 for a moment.
            if exc.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_of(pipe: Pipeline, eid: str) -> dict[str, Any] | None:
    try:
        answer: dict[str, Any] = http_json(
            f"{pipe.gateway_url}/v1/workflows/runs/{eid}", headers=RUN_BEARER
        )
        return answer
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait_run(pipe: Pipeline, eid: str, timeout: float = 120) -> dict[str, Any]:
    """The run once it ended."""
    deadline = time.monotonic() + timeout
    run: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        run = run_of(pipe, eid)
        if run is not None and run["status"] in engine.FINISHED:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {eid} did not end within {timeout} s: {run}")


def shown(run: dict[str, Any]) -> str:
    """A run in full for an assertion's message (pytest cuts a long dict short)."""
    return orjson.dumps(run, option=orjson.OPT_INDENT_2).decode()


def events_of(pipe: Pipeline, eid: str) -> list[dict[str, Any]]:
    return read_events(kafka_of(pipe), eid)
