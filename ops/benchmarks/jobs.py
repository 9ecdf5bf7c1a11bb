"""`sluice bench jobs`: no-op jobs/s from submit to COMPLETED, and submit-to-start latency on
an idle queue, next to BullMQ on Redis and a PostgreSQL `FOR UPDATE SKIP LOCKED` queue
(claiming one job and 100 jobs a transaction), all run in the same session with the same
job count and one worker process each.

Sluice: `sluice gateway` and one `sluice jobs work` as processes, a queue of the builtin
`noop`; the jobs go in over HTTP (`POST /v1/jobs/batch`, from a process of its own, over
several connections) and the clock stops when the worker's `sluice_jobs_completed` counter
has counted them all. Latency: one job at a time (`POST /v1/jobs`), its ACTIVE time
(`started_at_ms` on the status topic) minus the time just before the POST.

`--executor command`: the queue's jobs run `build/jobs/noop` (a C++ program that reads the
job from stdin and answers null) under the command executor, next to the same program run
by a plain asyncio subprocess loop in this process, at the same concurrency (each run
given a job document on stdin, its stdout read): the process-spawn ceiling.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import http.client
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from core.settings import KafkaSettings
from ops.benchmarks.harness import Bootstrap, JsonOut, console, percentile, report
from ops.errors import ProcessError
from ops.output import fail

QUEUE = "bench"
SUBMIT_KEY = "bench-submit-key"
NOOP = "connectors.jobs.builtin:noop"


NOOP_PROGRAM = Path("build/jobs/noop")


class BenchExecutor(enum.StrEnum):
    """What runs the benchmark's jobs."""

    python = "python"
    command = "command"


def queue_config(partitions: int, concurrency: int, priorities: int, executor: str) -> str:
    """The benchmark's pipeline config: one queue of the builtin no-op (or, `command`, of
    the no-op program)."""
    if executor == "command":
        run = f'{{type: command, argv: ["{NOOP_PROGRAM.resolve()}"]}}'
    else:
        run = f'{{type: python, function: "{NOOP}"}}'
    return f"""
queues:
  - name: {QUEUE}
    submit_keys: [{SUBMIT_KEY}]
    partitions: {partitions}
    priorities: {priorities}
    concurrency: {concurrency}
    executor: {run}
"""


def subprocess_loop(program: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    """The program run `jobs` times by a plain asyncio loop, `concurrency` at once, each
    given a job document on stdin and its stdout read: jobs/s."""

    async def main() -> float:
        gate = asyncio.Semaphore(concurrency)
        doc = orjson.dumps({"id": "x", "queue": QUEUE, "attempt": 1, "payload": None})

        async def one() -> None:
            async with gate:
                proc = await asyncio.create_subprocess_exec(
                    str(program),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, _ = await proc.communicate(doc)
                if proc.returncode != 0 or out.strip() != b"null":
                    raise RuntimeError(f"{program} answered {out!r}, exit {proc.returncode}")

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(jobs)))
        return time.perf_counter() - began

    elapsed = asyncio.run(main())
    return {"jobs_per_s": jobs / elapsed, "seconds": elapsed}


def sequential_loop(program: Path, jobs: int) -> dict[str, Any]:
    """The program run `jobs` times one after the other by `subprocess.run`, each given a
    job document on stdin and its stdout read: jobs/s."""
    doc = orjson.dumps({"id": "x", "queue": QUEUE, "attempt": 1, "payload": None})
    began = time.perf_counter()
    for _ in range(jobs):
        done = subprocess.run(  # noqa: S603 -- the benchmark's own program
            [str(program)], input=doc, capture_output=True, check=False
        )
        if done.returncode != 0 or done.stdout.strip() != b"null":
            raise RuntimeError(f"{program} answered {done.stdout!r}, exit {done.returncode}")
    elapsed = time.perf_counter() - began
    return {"jobs_per_s": jobs / elapsed, "seconds": elapsed}


def _submit_all(url: str, bodies: list[bytes], connections: int, out: Any) -> None:
    """The load process: every body posted once to /v1/jobs/batch over `connections`."""
    import aiohttp  # noqa: PLC0415
    import uvloop  # noqa: PLC0415

    async def main() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {SUBMIT_KEY}", "Content-Type": "application/json"}
        failures: list[str] = []
        todo = iter(bodies)
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def lane() -> None:
                for body in todo:
                    async with session.post(url, data=body, headers=headers) as resp:
                        text = await resp.read()
                        if resp.status != 202:
                            failures.append(f"{resp.status} {text[:200]!r}")

            first = time.time()
            await asyncio.gather(*(lane() for _ in range(connections)))
            return {"first_submit": first, "submitted": time.time(), "failures": failures}

    out.put(uvloop.run(main()))


def _completed(metrics_url: str) -> int:
    """The worker's `sluice_jobs_completed` counter for the queue (0 before it answers)."""
    return completed_count(metrics_url, QUEUE)


def completed_count(metrics_url: str, queue: str) -> int:
    """The worker's `sluice_jobs_completed` counter for `queue` (0 before it answers)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
    except OSError:
        return 0
    found = re.search(
        r'^sluice_jobs_completed_total\{queue="' + re.escape(queue) + r'"\} (\S+)', text, re.M
    )
    return int(float(found.group(1))) if found else 0


def _cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds of process `pid` so far (None where /proc cannot say)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, service: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if service.pid() is None:
            raise ProcessError(f"{service.name} exited: {service.tail(1)}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ProcessError(f"{service.name} was not ready within {timeout:.0f} s") from None
            time.sleep(0.2)


class _StatusReader:
    """Status records from now on (the status topic read from its end), by job id."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

        self.consumer = Consumer(
            kafka.client_config()
            | {"group.id": f"bench-status-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        parts = []
        for p in meta.partitions:
            high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            parts.append(TopicPartition(topic, p, high))
        self.consumer.assign(parts)

    def started_at(self, job_id: str, timeout: float = 30) -> int:
        """`started_at_ms` of `job_id` once its status says it started (ACTIVE or later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(100, timeout=0.05):
                if msg.error() is not None or msg.key() != job_id.encode():
                    continue
                status = orjson.loads(msg.value() or b"{}")
                if status.get("started_at_ms"):
                    return int(status["started_at_ms"])
        raise ProcessError(f"job {job_id} did not start within {timeout:.0f} s")

    def close(self) -> None:
        """Leave the topic."""
        self.consumer.close()


def _sluice_latency(
    kafka: KafkaSettings, gateway_port: int, topic: str, samples: int
) -> dict[str, float]:
    """Submit-to-start p50/p99 (ms), one job at a time, each after the one before started."""
    reader = _StatusReader(kafka, topic)
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=30)
    headers = {"Authorization": f"Bearer {SUBMIT_KEY}", "Content-Type": "application/json"}
    waits: list[float] = []
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("sluice: submit-to-start, one job at a time", total=samples)
            for n in range(samples + 1):  # the first one warms the path up and is not counted
                submitted = time.time() * 1000
                conn.request(
                    "POST", "/v1/jobs", orjson.dumps({"queue": QUEUE, "payload": n}), headers
                )
                resp = conn.getresponse()
                body = orjson.loads(resp.read())
                if resp.status != 202:
                    raise ProcessError(f"POST /v1/jobs answered {resp.status}: {body}")
                started = reader.started_at(body["id"])
                if n:
                    waits.append(started - submitted)
                    progress.update(task, completed=n)
    finally:
        conn.close()
        reader.close()
    waits.sort()
    return {"p50_ms": percentile(waits, 0.5), "p99_ms": percentile(waits, 0.99)}


def _sluice_throughput(
    gateway_port: int, metrics_url: str, jobs: int, batch: int, connections: int
) -> dict[str, float]:
    """Jobs/s from the first submit to the worker's count reaching every job."""
    bodies = [
        orjson.dumps(
            {
                "jobs": [
                    {"queue": QUEUE, "payload": {"n": n}}
                    for n in range(start, min(start + batch, jobs))
                ]
            }
        )
        for start in range(0, jobs, batch)
    ]
    base = _completed(metrics_url)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    load = ctx.Process(
        target=_submit_all,
        args=(f"http://127.0.0.1:{gateway_port}/v1/jobs/batch", bodies, connections, out),
        daemon=True,
    )
    load.start()
    submitted: dict[str, Any] | None = None
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"sluice: {jobs:,} jobs submitted and run", total=jobs)
            deadline = time.monotonic() + max(120.0, jobs / 200)
            while True:
                done = _completed(metrics_url) - base
                if done >= jobs:
                    finished = time.time()
                    break
                progress.update(task, completed=done)
                if submitted is None and not out.empty():
                    submitted = out.get()
                    if submitted["failures"]:
                        raise ProcessError(
                            f"the gateway refused a batch: {submitted['failures'][0]}"
                        )
                elif submitted is None and not load.is_alive() and out.empty():
                    raise ProcessError(f"the submitting process exited ({load.exitcode})")
                if time.monotonic() > deadline:
                    raise ProcessError(f"only {done:,} of {jobs:,} jobs completed in time")
                time.sleep(0.1)  # each read makes the worker render its metrics
        if submitted is None:
            submitted = out.get(timeout=60)
    finally:
        load.join(10)
        if load.is_alive():
            load.terminate()
    seconds = finished - submitted["first_submit"]
    return {
        "jobs_per_s": jobs / seconds,
        "seconds": seconds,
        "submit_s": submitted["submitted"] - submitted["first_submit"],
    }


def run_sluice(
    bootstrap: str,
    jobs: int,
    samples: int,
    batch: int,
    connections: int,
    partitions: int,
    concurrency: int,
    priorities: int,
    max_ready: int | None = None,
    executor: str = "python",
) -> dict[str, Any]:
    """Gateway and one job worker as processes on topics of their own: latency, then jobs/s."""
    from core.admin import apply_topics  # noqa: PLC0415
    from core.config import parse_config  # noqa: PLC0415
    from core.topics import Topics, required_topics  # noqa: PLC0415
    from ops.baseline_services import free_port  # noqa: PLC0415
    from ops.processes import BackgroundProcess  # noqa: PLC0415

    kafka = KafkaSettings(
        bootstrap_servers=bootstrap, topic_prefix=f"benchjobs{uuid.uuid4().hex[:8]}"
    )
    config_text = queue_config(partitions, concurrency, priorities, executor)
    with console.status("sluice: creating topics ..."):
        apply_topics(required_topics(parse_config(config_text), kafka), kafka)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-jobs-"))
    config = workdir / "sluice.yaml"
    config.write_text(config_text)
    gateway_port, jobs_port = free_port(), free_port()
    env = {
        "SLUICE_CONFIG_FILE": str(config),
        "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "SLUICE_GATEWAY_PORT": str(gateway_port),
        "SLUICE_JOBS_PORT": str(jobs_port),
        "SLUICE_JOBS_CONSUMER_GROUP": f"{kafka.topic_prefix}-jobs",
        "SLUICE_JOBS_MODULES": "connectors.jobs.builtin",
        "SLUICE_JOBS_COMMANDS": str(NOOP_PROGRAM.resolve()),
        "SLUICE_LOG_LEVEL": "WARNING",
    }
    if max_ready is not None:
        env["SLUICE_JOBS_MAX_READY"] = str(max_ready)
    gateway = BackgroundProcess("gateway", workdir)
    worker = BackgroundProcess("jobs", workdir)
    metrics_url = f"http://127.0.0.1:{jobs_port}/metrics"
    try:
        with console.status("sluice: starting the gateway and the job worker ..."):
            gateway.start(["gateway"], env)
            worker.start(["jobs", "work"], env)
            wait_ready(f"http://127.0.0.1:{gateway_port}/ready", gateway)
            wait_ready(f"http://127.0.0.1:{jobs_port}/ready", worker)
        status_topic = Topics(kafka.topic_prefix).jobs_status
        results: dict[str, Any] = _sluice_latency(kafka, gateway_port, status_topic, samples)
        before = {s.name: _cpu_seconds(s.pid()) for s in (gateway, worker)}
        results |= _sluice_throughput(gateway_port, metrics_url, jobs, batch, connections)
        # CPU each process spent on the run, per job (Linux's /proc; absent elsewhere).
        for service in (gateway, worker):
            used, start = _cpu_seconds(service.pid()), before[service.name]
            if used is not None and start is not None:
                results[f"{service.name}_cpu_us_per_job"] = (used - start) * 1e6 / jobs
    except ProcessError as exc:
        for service in (gateway, worker):
            if service.pid() is None:
                raise ProcessError(f"{exc}; {service.name} exited: {service.tail(1)}") from exc
        raise
    finally:
        worker.stop()
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def bench_jobs(
    jobs: Annotated[
        int, typer.Option(min=1, help="Jobs per setup (the same for every one).")
    ] = 50_000,
    samples: Annotated[
        int, typer.Option(min=1, help="Single jobs for submit-to-start latency, one at a time.")
    ] = 200,
    batch_size: Annotated[
        int, typer.Option(min=1, max=1000, help="Jobs per POST /v1/jobs/batch request.")
    ] = 1000,
    connections: Annotated[int, typer.Option(min=1, help="HTTP connections submitting.")] = 4,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the benchmark queue.")] = 4,
    concurrency: Annotated[
        int, typer.Option(min=1, help="The queue's `concurrency` (jobs at once in the worker).")
    ] = 100,
    priorities: Annotated[
        int, typer.Option(min=1, max=10, help="The queue's priority levels.")
    ] = 1,
    max_ready: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The job worker's SLUICE_JOBS_MAX_READY (jobs read and waiting before a"
            " priority is paused); the worker's default (1,000) when not given.",
        ),
    ] = None,
    baselines: Annotated[
        bool,
        typer.Option(
            help="Run the BullMQ and PostgreSQL baselines (Redis, PostgreSQL from Debian)."
        ),
    ] = True,
    redis_port: Annotated[int, typer.Option(help="redis-server's port (0: a free one).")] = 0,
    postgres_port: Annotated[int, typer.Option(help="PostgreSQL's port (0: a free one).")] = 0,
    executor: Annotated[
        BenchExecutor,
        typer.Option(
            help="python: the builtin no-op, next to BullMQ and PostgreSQL; command: the"
            " no-op C++ program (make examples), next to a plain subprocess loop."
        ),
    ] = BenchExecutor.python,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """No-op jobs/s (submit to COMPLETED) and submit-to-start latency, next to BullMQ and a
    PostgreSQL SKIP LOCKED queue run in the same session."""
    from ops.baseline_services import ensure_packages, postgres_server, redis_server  # noqa: PLC0415
    from ops.benchmarks import bullmq_queue, pg_queue  # noqa: PLC0415

    executor = BenchExecutor(executor)
    if executor == "command" and not NOOP_PROGRAM.is_file():
        fail(f"{NOOP_PROGRAM} is not there: build it with `make examples`")
    results: dict[str, Any] = {
        "executor": executor.value,
        "jobs": jobs,
        "cores": os.cpu_count(),
        "batch_size": batch_size,
        "connections": connections,
        "queue": {
            "partitions": partitions,
            "concurrency": concurrency,
            "priorities": priorities,
            "max_ready": max_ready,
        },
    }
    try:
        if baselines and executor == "command":
            with console.status(f"subprocess loop: {jobs:,} runs of {NOOP_PROGRAM} ..."):
                results["subprocess"] = subprocess_loop(NOOP_PROGRAM, jobs, concurrency)
            with console.status(f"sequential loop: {jobs:,} runs of {NOOP_PROGRAM} ..."):
                results["sequential"] = sequential_loop(NOOP_PROGRAM, jobs)
        elif baselines:
            with console.status("baselines: redis-server, postgresql and bullmq installed ..."):
                installed = ensure_packages()
                bullmq_queue.ensure_installed()
            if installed:
                console.print(f"installed from Debian: {', '.join(installed)}")
            with redis_server(redis_port) as redis:
                with console.status("BullMQ: submit-to-start, one job at a time ..."):
                    results["bullmq"] = bullmq_queue.latency(redis.port, samples)
                with console.status(f"BullMQ: {jobs:,} jobs ...") as status:
                    results["bullmq"] |= bullmq_queue.throughput(
                        redis.port, jobs, lambda s: status.update(f"BullMQ: {jobs:,} jobs, {s} ...")
                    )
            with postgres_server(postgres_port) as pg:
                for claim in (1, 100):
                    with Progress(console=console, transient=True) as progress:
                        task = progress.add_task(
                            f"PostgreSQL: {jobs:,} jobs, {claim} a claim", total=jobs
                        )
                        results[f"postgres_{claim}"] = pg_queue.run(
                            pg.dsn,
                            jobs,
                            claim,
                            on_progress=functools.partial(_advance, progress, task),
                        )
        results["sluice"] = run_sluice(
            bootstrap or KafkaSettings().bootstrap_servers,
            jobs,
            samples,
            batch_size,
            connections,
            partitions,
            concurrency,
            priorities,
            max_ready,
            executor.value,
        )
    except (ProcessError, RuntimeError) as exc:
        fail(str(exc))
    _report(results, json_out)


def _advance(progress: Progress, task: TaskID, done: int) -> None:
    progress.update(task, completed=done)


def _ms(result: dict[str, Any], name: str) -> str:
    return f"{result[name]:.1f} ms" if name in result else "—"


def _report(results: dict[str, Any], json_out: Path | None) -> None:
    sluice = results["sluice"]["jobs_per_s"]
    q = results["queue"]
    table = Table(
        title=f"Jobs: {results['jobs']:,} no-op jobs"
        + (" run as a C++ program" if results["executor"] == "command" else "")
        + f", one worker process each ({results['cores']} cores)"
    )
    for col in ("setup", "jobs/s", "Sluice / this", "p50 submit-to-start", "p99 submit-to-start"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    rows = [
        ("sluice", "Sluice"),
        ("subprocess", "a plain subprocess loop"),
        ("sequential", "subprocess.run, one at a time"),
        ("bullmq", "BullMQ on Redis"),
        ("postgres_1", "PostgreSQL, 1 a claim"),
        ("postgres_100", "PostgreSQL, 100 a claim"),
    ]
    ratios: dict[str, float] = {}
    for key, label in rows:
        if key not in results:
            continue
        r = results[key]
        ratio = sluice / r["jobs_per_s"]
        if key != "sluice":
            ratios[key] = ratio
        table.add_row(
            label,
            f"{r['jobs_per_s']:,.0f}",
            "" if key == "sluice" else f"{ratio:.2f}x",
            _ms(r, "p50_ms"),
            _ms(r, "p99_ms"),
        )
    results["ratios"] = ratios
    floors: dict[str, bool] = {}
    if "subprocess" in ratios:
        floors["at least 0.7x the plain subprocess loop"] = ratios["subprocess"] >= 0.7
        floors["at least 0.7x the faster of the two loops"] = (
            min(ratios["subprocess"], ratios["sequential"]) >= 0.7
        )
    if "bullmq" in ratios:
        floors["at least BullMQ's jobs/s"] = ratios["bullmq"] >= 1
    if "postgres_1" in ratios:
        floors["at least 5x the one-at-a-time PostgreSQL queue"] = ratios["postgres_1"] >= 5
    results["floors"] = floors
    report(table, results, json_out)
    notes = [
        f"Sluice: `sluice gateway` + one `sluice jobs work`, a queue of {q['partitions']}"
        f" partitions, {q['priorities']} priorities, concurrency {q['concurrency']}"
        + (f", SLUICE_JOBS_MAX_READY={q['max_ready']}" if q["max_ready"] else "")
        + "; submitted"
        f" with POST /v1/jobs/batch, {results['batch_size']} a request,"
        f" {results['connections']} connections."
    ]
    if "subprocess" in results:
        notes.append(
            f"Subprocess loop: {NOOP_PROGRAM} started by asyncio.create_subprocess_exec,"
            f" {q['concurrency']} at once, the job document on stdin, stdout read; no Kafka."
            " subprocess.run: the same, one at a time."
        )
    if "bullmq" in results:
        notes.append(
            "BullMQ: redis-server with appendonly yes, appendfsync everysec; one worker,"
            " concurrency 100, a no-op processor; addBulk of 1,000, removeOnComplete."
        )
    if "postgres_1" in results:
        notes.append(
            "PostgreSQL: synchronous_commit=on; SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP"
            " LOCKED, the no-op, DELETE as the ack, a commit a claim; COPY of 1,000 a"
            " transaction to submit."
        )
    console.print("\n".join(notes), highlight=False)
    cpu = [
        f"{label} {results['sluice'][f'{name}_cpu_us_per_job']:,.0f} µs"
        for name, label in (("gateway", "gateway"), ("jobs", "job worker"))
        if f"{name}_cpu_us_per_job" in results["sluice"]
    ]
    if cpu:
        console.print("Sluice's CPU a job: " + ", ".join(cpu) + ".")
    for name, met in floors.items():
        console.print(f"floor, {name}: " + ("[green]met[/green]" if met else "[red]not met[/red]"))
