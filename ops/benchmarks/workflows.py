"""`sluice bench workflows`: steps/s of a 1,000-way workflow fan-out, next to the same number
of plain jobs and of bare Python processes, all in the same run.

One gateway, one job worker and one orchestrator as processes on topics of their own, with
two queues: `workflows` (the tool runner, `connectors.workflows.tools:run_step`) and `bench`
(the builtin no-op). The setups, in this order, each with `--steps` units of work:

- **plain jobs**: no-op jobs on `bench` over `POST /v1/jobs/batch`, from the first submit to
  the worker's `sluice_jobs_completed` counter reaching them all;
- **workflow, job steps**: one run of a playbook whose only step is a parallel loop
  (`max_in_flight` = the step count) of `job` steps on `bench`: the orchestrator's cost
  per step (an issued command, a job, a status read back, a decision in a transaction);
- **workflow, python steps**: the same loop of no-op `python` steps (`result = None`): each
  one a job of the `workflows` queue whose runner starts a `python -I -S` process;
- **python processes**: the same runner script started that many times by a plain asyncio
  loop at the queue's concurrency, with nothing else around: the ceiling of python steps
  on this machine.

A run's time is its own record: `ended_at_ms - requested_at_ms` (the gateway's clock when
it took the POST, the orchestrator's when the run ended); one warm-up run of 10 items goes
first. The ratios are each setup's steps/s over the plain jobs'.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import yaml
from rich.progress import Progress
from rich.table import Table

from core.settings import KafkaSettings
from ops.benchmarks.harness import Bootstrap, JsonOut, console, report
from ops.errors import ProcessError
from ops.output import fail

QUEUE = "bench"
SUBMIT_KEY = "bench-submit-key"
RUN_KEY = "bench-run-key"
NOOP = "connectors.jobs.builtin:noop"
RUNNER = "connectors.workflows.tools:run_step"


def pipeline_config(concurrency: int) -> str:
    """Two queues (the tool runner's and the no-op's) and the run key."""
    return f"""
queues:
  - name: workflows
    partitions: 4
    priorities: 1
    concurrency: {concurrency}
    max_attempts: 1
    executor: {{type: python, function: "{RUNNER}"}}
  - name: {QUEUE}
    submit_keys: [{SUBMIT_KEY}]
    partitions: 4
    priorities: 1
    concurrency: {concurrency}
    executor: {{type: python, function: "{NOOP}"}}
workflows:
  run_keys: [{RUN_KEY}]
"""


def fanout_playbook(path: str, tool: dict[str, Any], width: int) -> str:
    """A playbook whose start step is a parallel loop over `workload.n` items of `tool`."""
    return yaml.safe_dump(
        {
            "apiVersion": "noetl.io/v2",
            "kind": "Playbook",
            "metadata": {"name": path.rsplit("/", 1)[-1], "path": path},
            "workload": {"n": 10},
            "workflow": [
                {
                    "step": "start",
                    "loop": {
                        "in": "{{ range(workload.n) | list }}",
                        "iterator": "item",
                        "spec": {"mode": "parallel", "max_in_flight": width},
                    },
                    "tool": tool,
                    "next": {"arcs": [{"step": "end"}]},
                },
                {"step": "end"},
            ],
        },
        sort_keys=False,
    )


PYTHON_TOOL = {"kind": "python", "code": "result = None"}
JOB_TOOL = {"kind": "job", "queue": QUEUE, "payload": {"n": "{{ iter.item }}"}}


def _http(method: str, url: str, body: Any = None, key: str = RUN_KEY) -> tuple[int, Any]:
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(  # noqa: S310 - loopback
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
            return resp.status, orjson.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"null")


def _run_workflow(gateway: str, path: str, n: int, label: str) -> dict[str, Any]:
    """One run of the fan-out with `n` items: its steps/s by its own record."""
    deadline = time.monotonic() + 30
    while True:
        code, answer = _http(
            "POST", f"{gateway}/v1/workflows/runs", {"path": path, "workload": {"n": n}}
        )
        if code == 202:
            break
        if code != 404 or time.monotonic() > deadline:  # the catalog is read as it is applied
            raise ProcessError(f"POST /v1/workflows/runs answered {code}: {answer}")
        time.sleep(0.2)
    eid = answer["id"]
    deadline = time.monotonic() + max(120.0, n / 5)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{label}: {n:,} steps", total=n)
        while True:
            code, run = _http("GET", f"{gateway}/v1/workflows/runs/{eid}")
            if code == 200:
                progress.update(
                    task, completed=(run["steps"].get("start") or {}).get("items_done") or 0
                )
                if run["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                    break
            if time.monotonic() > deadline:
                raise ProcessError(f"{label}: the run did not end in time: {run}")
            time.sleep(0.25)
    if run["status"] != "COMPLETED":
        raise ProcessError(f"{label}: the run ended {run['status']}: {run.get('error')}")
    seconds = (run["ended_at_ms"] - run["requested_at_ms"]) / 1000
    return {"steps_per_s": n / seconds, "seconds": seconds, "execution_id": eid}


def _plain_jobs(gateway: str, metrics_url: str, n: int) -> dict[str, Any]:
    """`n` no-op jobs submitted in batches of 1,000, until the worker counted them all."""
    from ops.benchmarks.jobs import completed_count  # noqa: PLC0415

    base = completed_count(metrics_url, QUEUE)
    first = time.time()
    for start in range(0, n, 1000):
        jobs = [{"queue": QUEUE, "payload": {"n": i}} for i in range(start, min(start + 1000, n))]
        code, answer = _http("POST", f"{gateway}/v1/jobs/batch", {"jobs": jobs}, SUBMIT_KEY)
        if code != 202:
            raise ProcessError(f"POST /v1/jobs/batch answered {code}: {answer}")
    deadline = time.monotonic() + max(120.0, n / 20)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"plain jobs: {n:,}", total=n)
        while (done := completed_count(metrics_url, QUEUE) - base) < n:
            progress.update(task, completed=done)
            if time.monotonic() > deadline:
                raise ProcessError(f"plain jobs: only {done:,} of {n:,} completed in time")
            time.sleep(0.05)
    seconds = time.time() - first
    return {"steps_per_s": n / seconds, "seconds": seconds}


def python_processes(n: int, concurrency: int) -> dict[str, Any]:
    """The python step's runner started `n` times, `concurrency` at once, by a plain loop."""
    from connectors.workflows.tools import PYTHON_STEP, SITE_PATHS  # noqa: PLC0415

    request = orjson.dumps({"code": "result = None", "input": {}, "path": SITE_PATHS})
    base = Path(tempfile.mkdtemp(prefix="sluice-bench-python-"))

    async def one(i: int, gate: asyncio.Semaphore) -> None:
        out = base / f"{i}.json"
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                str(PYTHON_STEP),
                str(out),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=base,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
            )
            await proc.communicate(request)
        if not orjson.loads(out.read_bytes()).get("ok"):
            raise ProcessError("the python step runner failed on a no-op")

    async def main() -> float:
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()
        await asyncio.gather(*(one(i, gate) for i in range(n)))
        return time.perf_counter() - start

    try:
        with console.status(f"python processes: {n:,} runs, {concurrency} at once ..."):
            seconds = asyncio.run(main())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"steps_per_s": n / seconds, "seconds": seconds}


def run_bench(bootstrap: str, steps: int, concurrency: int) -> dict[str, Any]:
    from core.admin import apply_topics  # noqa: PLC0415
    from core.config import parse_config  # noqa: PLC0415
    from core.topics import required_topics  # noqa: PLC0415
    from ops.baseline_services import free_port  # noqa: PLC0415
    from ops.benchmarks.jobs import wait_ready  # noqa: PLC0415
    from ops.cli_workflows import apply_playbook  # noqa: PLC0415
    from ops.processes import BackgroundProcess  # noqa: PLC0415

    kafka = KafkaSettings(
        bootstrap_servers=bootstrap, topic_prefix=f"benchwf{uuid.uuid4().hex[:8]}"
    )
    text = pipeline_config(concurrency)
    with console.status("sluice: creating topics ..."):
        apply_topics(required_topics(parse_config(text), kafka), kafka)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-workflows-"))
    (workdir / "sluice.yaml").write_text(text)
    gateway_port, jobs_port, orch_port = free_port(), free_port(), free_port()
    env = {
        "SLUICE_CONFIG_FILE": str(workdir / "sluice.yaml"),
        "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "SLUICE_GATEWAY_PORT": str(gateway_port),
        "SLUICE_JOBS_PORT": str(jobs_port),
        "SLUICE_JOBS_CONSUMER_GROUP": f"{kafka.topic_prefix}-jobs",
        "SLUICE_JOBS_MODULES": "connectors.jobs.builtin,connectors.workflows.tools",
        "SLUICE_WORKFLOWS_PORT": str(orch_port),
        "SLUICE_WORKFLOWS_CONSUMER_GROUP": f"{kafka.topic_prefix}-workflows",
        "SLUICE_WORKFLOWS_MAX_IN_FLIGHT": str(max(1000, steps)),
        "SLUICE_LOG_LEVEL": "WARNING",
    }
    services = [
        BackgroundProcess("gateway", workdir),
        BackgroundProcess("jobs", workdir),
        BackgroundProcess("orchestrator", workdir),
    ]
    commands = (["gateway"], ["jobs", "work"], ["workflow", "orchestrate"])
    ports = (gateway_port, jobs_port, orch_port)
    gateway = f"http://127.0.0.1:{gateway_port}"
    results: dict[str, Any] = {}
    try:
        with console.status("sluice: starting the gateway, the job worker, the orchestrator ..."):
            for service, command in zip(services, commands, strict=True):
                service.start(command, env)
            for service, port in zip(services, ports, strict=True):
                wait_ready(f"http://127.0.0.1:{port}/ready", service)
            for name, tool in (("python", PYTHON_TOOL), ("job", JOB_TOOL)):
                apply_playbook(kafka, fanout_playbook(f"bench/{name}", tool, steps))
        _run_workflow(gateway, "bench/python", 10, "warm-up")
        results["jobs"] = _plain_jobs(gateway, f"http://127.0.0.1:{jobs_port}/metrics", steps)
        results["job_steps"] = _run_workflow(gateway, "bench/job", steps, "workflow, job steps")
        results["python_steps"] = _run_workflow(
            gateway, "bench/python", steps, "workflow, python steps"
        )
    except ProcessError as exc:
        for service in services:
            if service.pid() is None:
                raise ProcessError(f"{exc}; {service.name} exited: {service.tail(1)}") from exc
        raise
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def bench_workflows(
    steps: Annotated[
        int, typer.Option(min=10, help="Steps of the fan-out (and plain jobs, and processes).")
    ] = 1000,
    concurrency: Annotated[
        int,
        typer.Option(min=1, help="Jobs at once in the worker per queue (and processes at once)."),
    ] = 16,
    baseline: Annotated[
        bool, typer.Option(help="Also start the python step runner that often by a plain loop.")
    ] = True,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Steps/s of a workflow fan-out (python steps and job steps) next to plain jobs and
    bare Python processes in the same run."""
    results: dict[str, Any] = {"steps": steps, "concurrency": concurrency, "cores": os.cpu_count()}
    try:
        results |= run_bench(bootstrap or KafkaSettings().bootstrap_servers, steps, concurrency)
        if baseline:
            results["python_processes"] = python_processes(steps, concurrency)
    except (ProcessError, RuntimeError) as exc:
        fail(str(exc))
    _report(results, json_out)


def _report(results: dict[str, Any], json_out: Path | None) -> None:
    jobs = results["jobs"]["steps_per_s"]
    table = Table(
        title=f"Workflows: a {results['steps']:,}-way fan-out, one worker and one orchestrator"
        f" process, {results['concurrency']} jobs at once ({results['cores']} cores)"
    )
    for col in ("setup", "steps/s", "seconds", "this / plain jobs"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    rows = [
        ("jobs", "plain jobs (builtin no-op)"),
        ("job_steps", "workflow: job steps (builtin no-op)"),
        ("python_steps", "workflow: python steps (result = None)"),
        ("python_processes", "python processes, a plain loop"),
    ]
    ratios: dict[str, float] = {}
    for key, label in rows:
        if key not in results:
            continue
        rate = results[key]["steps_per_s"]
        ratios[key] = rate / jobs
        table.add_row(label, f"{rate:,.0f}", f"{results[key]['seconds']:.2f}", f"{rate / jobs:.2f}")
    results["ratios_to_plain_jobs"] = ratios
    report(table, results, json_out)
