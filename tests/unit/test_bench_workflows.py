"""The pieces of `sluice bench workflows` that need no broker: its config and playbooks."""

from __future__ import annotations

import yaml

from core.config import WORKFLOW_RUNNER, PythonExecutor, parse_config
from core.workflows.catalog import parse
from ops.benchmarks.workflows import (
    JOB_TOOL,
    PYTHON_TOOL,
    QUEUE,
    fanout_playbook,
    pipeline_config,
    python_processes,
)


def test_the_benchmark_pipeline_has_the_step_runner_and_the_noop_queue() -> None:
    cfg = parse_config(pipeline_config(concurrency=7))
    runner, noop = cfg.queues
    assert isinstance(runner.executor, PythonExecutor)
    assert runner.executor.function == WORKFLOW_RUNNER
    assert runner.submit_keys == ()
    assert noop.name == QUEUE
    assert (runner.concurrency, noop.concurrency) == (7, 7)
    assert cfg.workflows.run_keys


def test_the_fanout_playbooks_are_accepted_with_their_width() -> None:
    for tool in (PYTHON_TOOL, JOB_TOOL):
        text = fanout_playbook("bench/x", tool, 1000)
        _, book = parse(text)
        assert book.metadata.path == "bench/x"
        loop = yaml.safe_load(text)["workflow"][0]["loop"]
        assert loop["spec"] == {"mode": "parallel", "max_in_flight": 1000}


def test_the_process_baseline_runs_the_step_runner() -> None:
    result = python_processes(20, 4)
    assert result["steps_per_s"] > 0
    assert result["seconds"] > 0
