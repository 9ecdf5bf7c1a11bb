"""`sluice demo`: the whole local pipeline with sample traffic, left running for a look."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from core.config import CommandExecutor, Queue, load_config
from core.errors import SluiceError
from core.settings import (
    AppSettings,
    BrokerSettings,
    DeliverySettings,
    GatewaySettings,
    JobSettings,
    KafkaSettings,
    WarehouseSettings,
    WorkflowSettings,
)
from ops.errors import ProcessError
from ops.output import print_rows
from ops.processes import BackgroundProcess
from ops.warehouse_query import query_warehouse

RUN_DIR = Path(".sluice") / "run"
SERVICES = ("sink", "deliver", "jobs", "orchestrator", "worker", "gateway")
# The command line of a service, where it is not its name.
ARGS = {"jobs": ["jobs", "work"], "orchestrator": ["workflow", "orchestrate"]}
# The playbook the demo applies and runs.
PLAYBOOK = Path("examples") / "workflows" / "primes-report.yaml"
# The demo's job worker may run the example programs (built by `make` into build/jobs/).
ENV = {
    "jobs": {
        "SLUICE_JOBS_COMMANDS": os.environ.get("SLUICE_JOBS_COMMANDS", "build/jobs,examples/jobs")
    }
}


def _wait_http(url: str, service: BackgroundProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.pid() is None:
            raise ProcessError(f"{service.name} exited; its log says:\n{service.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own loopback URL
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise ProcessError(
        f"{service.name} did not answer {url} within {timeout:.0f}s; see {service.log_file}"
    )


def run_demo(out: Console, count: int) -> None:
    """Start everything, send `count` sample events, print what landed in the warehouse."""
    from core.admin import apply_topics  # noqa: PLC0415
    from core.topics import required_topics  # noqa: PLC0415
    from ops.kafka_broker import start_broker  # noqa: PLC0415
    from ops.traffic import sample_events, send_batches  # noqa: PLC0415

    app_settings, kafka, gw, wh, dl = (
        AppSettings(),
        KafkaSettings(),
        GatewaySettings(),
        WarehouseSettings(),
        DeliverySettings(),
    )
    cfg = load_config(app_settings.config_file)
    start_broker(BrokerSettings(), out)
    created = [
        c for c in apply_topics(required_topics(cfg, kafka), kafka) if c.action != "unchanged"
    ]
    out.print(f"topics ready ({len(created)} created or updated)")
    services = {name: BackgroundProcess(name, RUN_DIR) for name in SERVICES}
    for name, service in services.items():
        pid = service.start(ARGS.get(name, [name]), ENV.get(name))
        out.print(f"{name:8} running, pid {pid}, log {service.log_file}")
    _wait_http(f"http://{wh.query_host}:{wh.query_port}/health", services["sink"], 60)
    _wait_http(f"http://{dl.host}:{dl.port}/health", services["deliver"], 60)
    jobs = JobSettings()
    _wait_http(f"http://{jobs.host}:{jobs.port}/health", services["jobs"], 60)
    _wait_http(f"http://{gw.host}:{gw.port}/ready", services["gateway"], 60)

    key = cfg.sources[0].write_keys[0]
    before = _count(wh)
    out.print(f"sending {count} sample events to http://{gw.host}:{gw.port}/v1/batch ...")
    hooks_before = _count(wh, "webhooks")
    events = sample_events(count)
    report = asyncio.run(send_batches(f"http://{gw.host}:{gw.port}", key, events, 50))
    out.print(f"gateway accepted {report.accepted}, rejected {report.rejected}")
    if report.accepted != count:
        raise SluiceError(f"the gateway accepted {report.accepted} of {count} events")
    deadline = time.monotonic() + 90
    with out.status("waiting for the rows to land in the warehouse ..."):
        while _count(wh) < before + count:
            if time.monotonic() > deadline:
                raise SluiceError(
                    f"only {_count(wh) - before} of {count} events reached the warehouse in 90s; "
                    f"see the logs in {RUN_DIR}"
                )
            time.sleep(0.5)
    cols, rows = query_warehouse(
        "SELECT type, count() AS events, uniqExact(user_id) AS users FROM events GROUP BY type "
        "ORDER BY events DESC",
        wh,
    )
    print_rows(cols, rows, title="Warehouse: events by type")
    cols, rows = query_warehouse(
        "SELECT event_text AS event, count() AS events FROM tracks GROUP BY event_text "
        "ORDER BY events DESC",
        wh,
    )
    print_rows(cols, rows, title="Warehouse: the `tracks` table, one row per track event")
    cols, rows = query_warehouse(
        "SELECT formatDateTime(timestamp, '%Y-%m-%d %H:%i:%S') AS time, user_id, price, sku "
        "FROM order_completed ORDER BY timestamp DESC LIMIT 5",
        wh,
    )
    print_rows(cols, rows, title="Warehouse: `order_completed`, its properties as columns")
    if any(d.id == "crm" for d in cfg.destinations):
        tracks = sum(1 for e in events if e["type"] == "track")
        _show_deliveries(out, kafka, wh, dl, hooks_before + tracks)
    if cfg.queues:
        _submit_jobs(out, cfg.queues[0], kafka, f"http://{gw.host}:{gw.port}")
    programs = [q for q in cfg.queues if isinstance(q.executor, CommandExecutor)]
    if programs:
        _run_programs(out, programs, f"http://{gw.host}:{gw.port}")
    if cfg.workflows.run_keys and PLAYBOOK.exists():
        wf = WorkflowSettings()
        _wait_http(f"http://{wf.host}:{wf.port}/ready", services["orchestrator"], 60)
        _run_workflow(out, kafka, cfg.workflows.run_keys[0], f"http://{gw.host}:{gw.port}")
    out.print(
        "\nThe broker, gateway, worker, sink, delivery, job worker and workflow orchestrator"
        " keep running. Try:\n"
        '  .venv/bin/sluice sql "SELECT * FROM identifies ORDER BY timestamp DESC LIMIT 5"\n'
        "  .venv/bin/sluice send --count 1000\n"
        "  .venv/bin/sluice dlq list legacy-crm\n"
        "  .venv/bin/sluice jobs list demo-jobs --key demo-submit-key\n"
        "  .venv/bin/sluice workflow run examples/primes-report --wait --key demo-run-key\n"
        "  .venv/bin/sluice workflow list --key demo-run-key\n"
        "Stop everything with: make stop"
    )


def _submit_jobs(out: Console, queue: Queue, kafka: KafkaSettings, gateway: str) -> None:
    """Submit a few jobs to the demo's queue, wait for the job worker to run them, and show
    how each ended."""
    from core.topics import Topics  # noqa: PLC0415
    from ops.cli_jobs import call_gateway, submit_job  # noqa: PLC0415

    top = queue.priorities - 1
    key = queue.submit_keys[0]
    jobs: list[dict[str, Any]] = [
        {"payload": {"mail": "welcome", "to": "user-0001"}, "priority": top},
        {"payload": {"mail": "digest"}, "priority": 0, "delay_ms": 3000},
        {"payload": {"report": "daily", "fail_attempts": 1}, "priority": 1},
        {"payload": {"export": "daily"}, "priority": 1, "idempotency_key": "export-today"},
        {"payload": {"export": "daily"}, "priority": 1, "idempotency_key": "export-today"},
    ]
    rows = []
    ids: list[str] = []
    for job in jobs:
        answer = submit_job(gateway, key, {"queue": queue.name, **job})
        topic = Topics(kafka.topic_prefix).queue(queue.name).priority(job["priority"])
        rows.append([answer["id"], answer["state"], str(job["priority"]), topic])
        if answer["id"] not in ids:
            ids.append(answer["id"])
    print_rows(
        ["job id", "state", "priority", "topic"],
        rows,
        title=f"Jobs: submitted to queue `{queue.name}` (the same idempotency key, the same id)",
    )
    if queue.executor is None:
        return
    finished: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    with out.status("waiting for the job worker to run them ..."):
        while len(finished) < len(ids) and time.monotonic() < deadline:
            for job_id in ids:
                try:
                    status = call_gateway(gateway, key, f"/v1/jobs/{job_id}")
                except ValueError:
                    continue  # not read by a worker yet
                if status["state"] in ("COMPLETED", "DEAD", "CANCELLED"):
                    finished[job_id] = status
            time.sleep(0.3)
    if len(finished) < len(ids):
        raise SluiceError(
            f"only {len(finished)} of {len(ids)} jobs finished within 60s; see {RUN_DIR}/jobs.log"
        )
    print_rows(
        ["job id", "state", "attempts", "history", "result"],
        [
            [
                job_id,
                finished[job_id]["state"],
                str(finished[job_id]["attempt"]),
                " > ".join(h["state"] for h in finished[job_id]["history"]),
                orjson.dumps(finished[job_id]["result"]).decode(),
            ]
            for job_id in ids
        ],
        title="Jobs: run by the job worker (one failed its first attempt and was retried)",
    )


def _run_programs(out: Console, queues: list[Queue], gateway: str) -> None:
    """Submit jobs to the queues whose executor runs a program (the C++ sieve, the Python
    word count), and show each one's result and the last progress it reported."""
    from ops.cli_jobs import call_gateway, submit_job  # noqa: PLC0415

    payloads: dict[str, list[dict[str, Any]]] = {
        "primes": [{"limit": n} for n in (1_000_000, 10_000_000, 50_000_000)],
        "words": [{"text": "Sluice runs jobs on Kafka topics", "sleep_s": 1}],
    }
    submitted: list[tuple[Queue, str]] = []
    for queue in queues:
        for payload in payloads.get(queue.name, [{}]):
            answer = submit_job(
                gateway, queue.submit_keys[0], {"queue": queue.name, "payload": payload}
            )
            submitted.append((queue, answer["id"]))
    finished: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    with out.status("waiting for the programs to run ..."):
        while len(finished) < len(submitted) and time.monotonic() < deadline:
            for queue, job_id in submitted:
                try:
                    status = call_gateway(gateway, queue.submit_keys[0], f"/v1/jobs/{job_id}")
                except ValueError:
                    continue
                if status["state"] in ("COMPLETED", "DEAD", "CANCELLED"):
                    finished[job_id] = status
            time.sleep(0.3)
    if len(finished) < len(submitted):
        raise SluiceError(
            f"only {len(finished)} of {len(submitted)} program jobs finished within 90s;"
            f" see {RUN_DIR}/jobs.log"
        )
    rows = []
    for queue, job_id in submitted:
        status = finished[job_id]
        progress = status.get("progress") or {}
        ran_ms = status["updated_at_ms"] - (status.get("started_at_ms") or status["updated_at_ms"])
        rows.append(
            [
                queue.name,
                job_id,
                status["state"],
                f"{progress.get('percent', '-')}% {progress.get('message', '')}".strip(),
                f"{ran_ms} ms",
                orjson.dumps(
                    status["result"] if status["state"] == "COMPLETED" else status["error"]
                ).decode(),
            ]
        )
    print_rows(
        ["queue", "job id", "state", "last progress", "ran", "result"],
        rows,
        title="Jobs: programs run by the command executor (C++ and Python, JSON on stdin/stdout)",
    )


def _show_deliveries(
    out: Console, kafka: KafkaSettings, wh: WarehouseSettings, dl: DeliverySettings, expected: int
) -> None:
    """The webhook side: `crm` posts tracks back to the gateway (a burst of them gets 429s and
    goes through the retry tiers); `legacy-crm` is refused (401) and dead-letters."""
    from ops.dlq import dead_letters  # noqa: PLC0415

    metrics = f"http://{dl.host}:{dl.port}/metrics"
    deadline = time.monotonic() + 90
    with out.status("waiting for the webhooks: `crm` through its retry tiers, `legacy-crm` ..."):
        while _count(wh, "webhooks") < expected and time.monotonic() < deadline:
            time.sleep(1)
    delivered = _metric_sum(metrics, "sluice_webhook_events_total", 'outcome="delivered"')
    retried = _metric_sum(metrics, "sluice_retry_records_total")
    out.print(
        f"\n`crm` webhook: {delivered:.0f} events delivered, {retried:.0f} of them retried "
        "through its tiers first (the gateway rate-limits the crm source and answered 429)."
    )
    cols, rows = query_warehouse(
        "SELECT count() AS events, max(received_at) AS last FROM webhooks", wh
    )
    print_rows(cols, rows, title="Warehouse: `webhooks`, what the crm hook posted back")
    letters = dead_letters(kafka, "legacy-crm")
    print_rows(
        ["ref", "error", "message", "attempts"],
        [
            [
                r.ref,
                r.error_class,
                r.headers.get("sluice.error.message", "")[:60],
                r.headers.get("sluice.attempts", ""),
            ]
            for r in letters[-5:]
        ],
        title=f"DLQ of `legacy-crm`: {len(letters)} dead letters (its write key was revoked)",
    )


def _metric_sum(url: str, name: str, having: str = "") -> float:
    """The sum of a Prometheus counter's series (those whose labels contain `having`)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own loopback URL
            text = resp.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and having in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _count(wh: WarehouseSettings, table: str = "events") -> int:
    try:
        _, rows = query_warehouse(f"SELECT count() FROM {table}", wh)  # noqa: S608 - our names
    except SluiceError:
        return 0  # not created yet
    return int(rows[0][0])


def _run_workflow(out: Console, kafka: KafkaSettings, key: str, gateway: str) -> None:
    """Apply the example playbook, run it, and show its steps, its result and its events."""
    from ops.cli_jobs import call_gateway  # noqa: PLC0415
    from ops.cli_workflows import apply_playbook, read_events  # noqa: PLC0415

    entry, _ = apply_playbook(kafka, PLAYBOOK.read_text())
    out.print(f"playbook {entry.path} version {entry.version} applied from {PLAYBOOK}")
    # The version just applied: a gateway that has not read it yet reads the catalog first.
    run_of = {"path": entry.path, "version": entry.version}
    answer = call_gateway(gateway, key, "/v1/workflows/runs", run_of)
    eid = answer["id"]
    run: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    with out.status(f"running workflow {eid} ..."):
        while time.monotonic() < deadline:
            try:
                run = call_gateway(gateway, key, f"/v1/workflows/runs/{eid}")
            except ValueError:
                run = {}
            if run.get("status") in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.3)
    if run.get("status") != "COMPLETED":
        raise SluiceError(
            f"workflow run {eid} is {run.get('status', 'not started')}: {run.get('error')};"
            f" see {RUN_DIR}/orchestrator.log and {RUN_DIR}/jobs.log"
        )
    print_rows(
        ["step", "state", "attempts", "ms", "items", "result"],
        [
            [
                name,
                step["state"],
                str(step["attempts"]),
                str(step["duration_ms"]),
                str(step.get("items", "")),
                orjson.dumps(step["result"]).decode()[:70],
            ]
            for name, step in run["steps"].items()
        ],
        title=f"Workflow {entry.path}: run {eid}, {run['duration_ms']} ms",
    )
    out.print(f"result: {orjson.dumps(run['result']).decode()}")
    types: dict[str, int] = {}
    for evt in read_events(kafka, eid):
        types[evt["type"]] = types.get(evt["type"], 0) + 1
    out.print(
        f"{sum(types.values())} events on the event log: "
        + ", ".join(f"{n} {t}" for t, n in types.items())
        + f"\n  (the timeline: .venv/bin/sluice workflow events {eid})"
    )


def stop_demo(out: Console) -> None:
    """Stop the demo's services (gracefully), then the broker."""
    from ops.kafka_broker import stop_broker  # noqa: PLC0415

    for name in reversed(SERVICES):
        stopped = BackgroundProcess(name, RUN_DIR).stop()
        out.print(f"{name:8} {'stopped' if stopped else 'was not running'}")
    stop_broker(BrokerSettings(), out)
