"""`sluice jobs`: run the job worker, submit jobs and read their status through the gateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from core.config import load_config
from core.errors import SluiceError
from core.settings import (
    AppSettings,
    GatewaySettings,
    JobSettings,
    KafkaSettings,
    TransformSettings,
)
from ops.output import fail, print_rows

jobs_app = typer.Typer(no_args_is_help=True)
console = Console()


def submit_job(gateway: str, key: str, job: dict[str, Any], timeout: float = 30) -> Any:
    """POST one job to `gateway`/v1/jobs with the submit key; the answer, or a one-line
    reason (ValueError) for a 4xx/5xx or an unreachable gateway."""
    return call_gateway(gateway, key, "/v1/jobs", job, timeout)


def call_gateway(
    gateway: str,
    key: str,
    path: str,
    body: Any | None = None,
    timeout: float = 30,
    method: str | None = None,
) -> Any:
    """GET (or, with a body, POST) `path` of the jobs API with the submit key; the JSON
    answer, or a one-line reason (ValueError) for a 4xx/5xx or an unreachable gateway."""
    if not gateway.startswith(("http://", "https://")):
        raise ValueError(f"the gateway URL must start with http:// or https://: {gateway}")
    headers = {"Authorization": f"Bearer {key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        f"{gateway.rstrip('/')}{path}",
        data=None if body is None else orjson.dumps(body),
        headers=headers,
        method=method,
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - checked
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise ValueError(f"the gateway answered {exc.code}: {reason}") from None
    except OSError as exc:
        raise ValueError(f"gateway {gateway} unreachable: {exc}") from None


@jobs_app.command("submit")
def submit(
    queue: Annotated[str, typer.Argument(help="The queue to submit to.")],
    payload: Annotated[str, typer.Option(help="The job's input, as JSON.")] = "null",
    priority: Annotated[int, typer.Option(help="0 (lowest) to the queue's top priority.")] = 0,
    delay_ms: Annotated[int | None, typer.Option(help="Run it no sooner than this.")] = None,
    run_at: Annotated[
        str | None, typer.Option(help="Run it no sooner than this ISO time (with a zone).")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="The same key on the same queue is the same job.")
    ] = None,
    ordering_key: Annotated[
        str | None, typer.Option(help="Jobs of one key run one at a time, in order.")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option(help="A tag (repeat for more).")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Instead of the queue's.")] = None,
    timeout_ms: Annotated[int | None, typer.Option(help="Instead of the queue's.")] = None,
    key: Annotated[
        str, typer.Option(envvar="SLUICE_SUBMIT_KEY", help="A submit key of the queue.")
    ] = "",
    gateway: Annotated[
        str | None, typer.Option(help="The gateway's URL (default: this machine's gateway).")
    ] = None,
) -> None:
    """Submit one job; prints its id and state once Kafka confirmed it."""
    if not key:
        fail("no submit key: pass --key or set SLUICE_SUBMIT_KEY")
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        fail(f"--payload is not JSON: {exc}")
    job: dict[str, Any] = {"queue": queue, "payload": body, "priority": priority}
    optional = {
        "delay_ms": delay_ms,
        "run_at": run_at,
        "idempotency_key": idempotency_key,
        "ordering_key": ordering_key,
        "max_attempts": max_attempts,
        "timeout_ms": timeout_ms,
    }
    job.update({name: value for name, value in optional.items() if value is not None})
    if tag:
        job["tags"] = tag
    if gateway is None:
        gw = GatewaySettings()
        gateway = f"http://{gw.host}:{gw.port}"
    try:
        answer = submit_job(gateway, key, job)
    except ValueError as exc:
        fail(str(exc))
    console.print(f"{answer['id']} {answer['state']} on queue {answer['queue']}")


KeyOption = Annotated[
    str, typer.Option(envvar="SLUICE_SUBMIT_KEY", help="A submit key of the queue.")
]
GatewayOption = Annotated[
    str | None, typer.Option(help="The gateway's URL (default: this machine's gateway).")
]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _gateway(gateway: str | None) -> str:
    if gateway is not None:
        return gateway
    gw = GatewaySettings()
    return f"http://{gw.host}:{gw.port}"


def _ask(gateway: str | None, key: str, path: str) -> Any:
    if not key:
        fail("no submit key: pass --key or set SLUICE_SUBMIT_KEY")
    try:
        return call_gateway(_gateway(gateway), key, path)
    except ValueError as exc:
        fail(str(exc))


@jobs_app.command("status")
def status(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """A job's state, attempt, result or error, and its history."""
    answer = _ask(gateway, key, f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
    if json_out:
        console.print_json(orjson.dumps(answer).decode())
        return
    console.print(
        f"{answer['id']} {answer['state']} on queue {answer['queue']}, attempt"
        f" {answer['attempt']} of {answer['max_attempts']}"
    )
    if answer.get("error"):
        console.print(f"error: {answer['error']}")
    if answer.get("result") is not None:
        console.print(f"result: {orjson.dumps(answer['result']).decode()}")
    for entry in answer.get("history", []):
        extra = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("state", "at_ms"))
        console.print(f"  {_when(entry['at_ms'])} {entry['state']} {extra}")


@jobs_app.command("list")
def list_jobs(
    queue: Annotated[str, typer.Argument(help="The queue.")],
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1 to 1000).")] = 50,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """A queue's jobs, the latest updated first."""
    query = {"queue": queue, "limit": str(limit)} | ({"state": state} if state else {})
    answer = _ask(gateway, key, f"/v1/jobs?{urllib.parse.urlencode(query)}")
    rows = [
        [j["id"], j["state"], str(j["attempt"]), _when(j["updated_at_ms"]), j.get("error") or ""]
        for j in answer["jobs"]
    ]
    print_rows(["id", "state", "attempt", "updated", "error"], rows)


_P = ("p50", "p90", "p99")


def _percentiles(figures: dict[str, Any]) -> str:
    return " / ".join("-" if figures.get(p) is None else str(figures[p]) for p in _P)


def _queue_rows(answer: dict[str, Any]) -> list[list[str]]:
    """A queue's figures (`GET /v1/queues/{q}`) as rows of a two-column table."""
    rows = [[state, str(n)] for state, n in answer["counts"].items()]
    rows.append(["in flight", str(answer.get("in_flight", answer["counts"].get("ACTIVE", 0)))])
    rates = answer.get("rates") or {}
    window = rates.get("window_s", 60)
    for name, value in rates.items():
        if name != "window_s":
            rows.append([f"{name}/s (last {window} s)", f"{value:g}"])
    latency = answer.get("latency")
    if latency:
        span = f"{latency['attempts']} attempts, last {latency['window_s']} s"
        rows.append([f"wait ms p50/p90/p99 ({span})", _percentiles(latency["wait_ms"])])
        rows.append([f"run ms p50/p90/p99 ({span})", _percentiles(latency["run_ms"])])
    return rows


@jobs_app.command("stats")
def stats(
    queue: Annotated[
        str | None, typer.Argument(help="The queue (default: every queue the key may use).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """A queue's jobs by state, in flight, rates over the last minute and wait and run
    time percentiles of recent attempts; every queue of the key when none is named."""
    if queue is None:
        answers = _ask(gateway, key, "/v1/queues")["queues"]
    else:
        answers = [_ask(gateway, key, f"/v1/queues/{urllib.parse.quote(queue, safe='')}")]
    if json_out:
        console.print_json(orjson.dumps(answers if queue is None else answers[0]).decode())
        return
    if not answers:
        console.print("no queues for this key")
    for answer in answers:
        print_rows(["figure", "value"], _queue_rows(answer), title=f"queue {answer['queue']}")


@jobs_app.command("cancel")
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    queue: Annotated[
        str | None, typer.Option(help="Its queue (needed for a job no worker has read yet).")
    ] = None,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """Cancel a job that is not finished (a running attempt is ended); fails for a finished one."""
    path = f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}"
    if queue:
        path += f"?{urllib.parse.urlencode({'queue': queue})}"
    if not key:
        fail("no submit key: pass --key or set SLUICE_SUBMIT_KEY")
    try:
        answer = call_gateway(_gateway(gateway), key, path, method="DELETE")
    except ValueError as exc:
        fail(str(exc))
    console.print(f"{answer['id']} {answer['state']} on queue {answer['queue']}")


@jobs_app.command("work")
def work(
    config: Annotated[
        Path | None, typer.Option(help="Pipeline config (default: SLUICE_CONFIG_FILE).")
    ] = None,
) -> None:
    """Run the job worker in the foreground: every queue with an executor; run several to scale."""
    from connectors.jobs.process import run  # noqa: PLC0415
    from ops.logs import configure_logging  # noqa: PLC0415

    try:
        cfg = load_config(config or AppSettings().config_file, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))
    configure_logging(AppSettings().log_level)
    try:
        run(JobSettings(), KafkaSettings(), cfg, TransformSettings())
    except SluiceError as exc:
        fail(str(exc))
