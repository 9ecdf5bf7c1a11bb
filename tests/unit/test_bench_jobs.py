"""The pieces of `sluice bench jobs` that need no broker, Redis or PostgreSQL."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from core.config import CommandExecutor, PythonExecutor, parse_config
from ops.benchmarks.harness import percentile
from ops.benchmarks.jobs import NOOP, NOOP_PROGRAM, QUEUE, SUBMIT_KEY, _cpu_seconds, queue_config
from ops.cli import app


def test_the_benchmark_queue_runs_the_builtin_noop() -> None:
    cfg = parse_config(queue_config(partitions=8, concurrency=100, priorities=1, executor="python"))
    (queue,) = cfg.queues
    assert queue.name == QUEUE
    assert queue.submit_keys == (SUBMIT_KEY,)
    assert (queue.partitions, queue.concurrency, queue.priorities) == (8, 100, 1)
    assert isinstance(queue.executor, PythonExecutor)
    assert queue.executor.function == NOOP


def test_the_command_benchmark_queue_runs_the_noop_program() -> None:
    cfg = parse_config(queue_config(partitions=4, concurrency=10, priorities=1, executor="command"))
    (queue,) = cfg.queues
    assert isinstance(queue.executor, CommandExecutor)
    assert queue.executor.argv == (str(NOOP_PROGRAM.resolve()),)


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 201)]
    assert percentile(values, 0.5) == 100.0
    assert percentile(values, 0.99) == 198.0
    assert percentile([7.0], 0.99) == 7.0


def test_cpu_seconds_of_a_running_and_a_missing_process() -> None:
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc")
    used = _cpu_seconds(os.getpid())
    assert used is not None
    assert used > 0
    assert _cpu_seconds(None) is None


def test_bench_jobs_has_help_and_refuses_a_bad_option() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["bench", "jobs", "--help"])
    assert shown.exit_code == 0
    assert "--no-baselines" in shown.output
    refused = runner.invoke(app, ["bench", "jobs", "--batch-size", "5000"])
    assert refused.exit_code != 0
