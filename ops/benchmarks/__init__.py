"""`sluice bench`: throughput of Sluice's stages, each next to a baseline measured in the same run.

`harness` (topics, input, timing, the report), `baselines` (the same work without Sluice),
`load` (the HTTP load generator) and one module per stage: `gateway`, `processor`, `sink`,
`jobs` (with its baselines `bullmq_queue` and `pg_queue`), `workflows`.
"""

import typer

from ops.benchmarks.gateway import bench_gateway
from ops.benchmarks.jobs import bench_jobs
from ops.benchmarks.processor import bench_processor
from ops.benchmarks.sink import bench_sink
from ops.benchmarks.workflows import bench_workflows

__all__ = ["bench_app"]

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against same-run baselines.")
bench_app.command("gateway")(bench_gateway)
bench_app.command("sink")(bench_sink)
bench_app.command("processor")(bench_processor)
bench_app.command("jobs")(bench_jobs)
bench_app.command("workflows")(bench_workflows)
