"""`sluice jobs submit`: a job to a queue through the gateway's jobs API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from core.settings import GatewaySettings
from ops.output import fail

jobs_app = typer.Typer(no_args_is_help=True)
console = Console()


def submit_job(gateway: str, key: str, job: dict[str, Any], timeout: float = 30) -> Any:
    """POST one job to `gateway`/v1/jobs with the submit key; the answer, or a one-line
    reason (ValueError) for a 4xx/5xx or an unreachable gateway."""
    if not gateway.startswith(("http://", "https://")):
        raise ValueError(f"the gateway URL must start with http:// or https://: {gateway}")
    req = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        f"{gateway.rstrip('/')}/v1/jobs",
        data=orjson.dumps(job),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
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
