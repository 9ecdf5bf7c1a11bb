"""`sluice workflow`: apply playbooks, run the orchestrator, start, follow and cancel runs.

`apply`, `events` and `rebuild` talk to Kafka (an operator's tools, like `sluice config`);
`run`, `status`, `cancel` and `list` go through the gateway's runs API with a run key.
"""

from __future__ import annotations

import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from confluent_kafka import Producer
from rich.console import Console

from core.follower import CompactedFollower, Entry
from core.kafka import producer_config
from core.settings import AppSettings, KafkaSettings
from core.topics import Topics
from core.workflows import engine
from core.workflows import events as ev
from core.workflows.catalog import Catalog, CatalogEntry, digest, parse
from core.workflows.playbook import PlaybookError
from ops.cli_jobs import _gateway, call_gateway
from ops.output import fail, print_rows

workflow_app = typer.Typer(no_args_is_help=True)
console = Console()

KeyOption = Annotated[
    str, typer.Option(envvar="SLUICE_RUN_KEY", help="A workflow run key (workflows.run_keys).")
]
GatewayOption = Annotated[
    str | None, typer.Option(help="The gateway's URL (default: this machine's gateway).")
]


def _ask(
    gateway: str | None, key: str, path: str, method: str | None = None, body: Any | None = None
) -> Any:
    if not key:
        fail("no run key: pass --key or set SLUICE_RUN_KEY")
    try:
        return call_gateway(_gateway(gateway), key, path, body, method=method)
    except ValueError as exc:
        fail(str(exc))


def _json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        fail(f"{what} is not JSON: {exc}")


def read_catalog(kafka: KafkaSettings) -> Catalog:
    """Every applied playbook, read from the catalog topic to its end."""
    catalog = Catalog()
    CompactedFollower(
        kafka, Topics(kafka.topic_prefix).workflows_catalog, catalog.apply, name="cli-catalog"
    ).read_to_end()
    return catalog


def apply_playbook(
    kafka: KafkaSettings, text: str, cron: str | None = None, workload: dict[str, Any] | None = None
) -> tuple[CatalogEntry, bool]:
    """Check a playbook and register it in the catalog: (its entry, whether it is new).

    The same text (and schedule) as the latest version changes nothing. PlaybookError
    for a playbook Sluice does not run.
    """
    document, book = parse(text)
    if cron is not None:
        from croniter import croniter  # noqa: PLC0415

        if not croniter.is_valid(cron):
            raise PlaybookError([f"schedule: {cron!r} is not a cron expression"])
    path = book.metadata.path
    latest = read_catalog(kafka).get(path)
    sha = digest(text)
    if (
        latest is not None
        and latest.digest == sha
        and latest.cron == cron
        and ((latest.workload or {}) == (workload or {}))
    ):
        return latest, False
    entry = CatalogEntry(
        path=path,
        version=1 if latest is None else latest.version + 1,
        playbook=document,
        text=text,
        digest=sha,
        applied_at_ms=ev.now_ms(),
        cron=cron,
        workload=workload if cron is not None else None,
    )
    producer = Producer(producer_config(kafka))
    failures: list[str] = []
    producer.produce(
        Topics(kafka.topic_prefix).workflows_catalog,
        entry.to_bytes(),
        entry.key,
        on_delivery=lambda err, _msg: failures.append(err.str()) if err else None,
    )
    if producer.flush(30) or failures:
        raise PlaybookError([f"the catalog did not take it: {failures or 'no answer'}"])
    return entry, True


def read_events(kafka: KafkaSettings, execution_id: str | None = None) -> list[dict[str, Any]]:
    """The committed workflow events (of one run, or all), in log order per run."""
    found: list[dict[str, Any]] = []
    key = None if execution_id is None else execution_id.encode()

    def take(entry: Entry) -> None:
        if entry.value is None or (key is not None and entry.key != key):
            return
        evt = ev.decode(entry.value)
        evt["_partition"], evt["_offset"] = entry.partition, entry.offset
        found.append(evt)

    CompactedFollower(
        kafka,
        Topics(kafka.topic_prefix).workflows_events,
        take,
        name="cli-events",
        committed=True,
        batch=1000,
    ).read_to_end()
    found.sort(key=lambda e: (e["_partition"], e["_offset"]))
    return found


def read_runs(kafka: KafkaSettings) -> dict[str, dict[str, Any]]:
    """The orchestrator's table: each run's latest summary."""
    runs: dict[str, dict[str, Any]] = {}

    def take(entry: Entry) -> None:
        if entry.key is not None and entry.value is not None:
            runs[entry.key.decode()] = orjson.loads(entry.value)

    CompactedFollower(
        kafka, Topics(kafka.topic_prefix).workflows_runs, take, name="cli-runs", committed=True
    ).read_to_end()
    return runs


def compare(kafka: KafkaSettings, result_limit: int = 4096) -> dict[str, str]:
    """Runs whose rebuild from the event topic differs from the table, with how."""
    events = [{k: v for k, v in e.items() if not k.startswith("_")} for e in read_events(kafka)]
    rebuilt = {
        eid: orjson.loads(orjson.dumps(engine.summary(run, result_limit), default=str))
        for eid, run in engine.rebuild(events).items()
    }
    table = read_runs(kafka)
    differ: dict[str, str] = {}
    for eid in sorted(set(rebuilt) | set(table)):
        mine, theirs = rebuilt.get(eid), table.get(eid)
        if mine is None or theirs is None:
            differ[eid] = "only in the table" if mine is None else "only in the events"
        elif mine != theirs:
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            differ[eid] = f"differs in {', '.join(keys)}"
    return differ


@workflow_app.command("orchestrate")
def orchestrate() -> None:
    """Run the workflow orchestrator in the foreground (run several to scale)."""
    from ops.logs import configure_logging  # noqa: PLC0415
    from streams.workflows.orchestrator import main  # noqa: PLC0415

    configure_logging(AppSettings().log_level)
    main()


@workflow_app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="The playbook (NoETL noetl.io/v2 YAML).")],
    cron: Annotated[
        str | None, typer.Option(help="Start a run on this cron schedule (UTC).")
    ] = None,
    workload: Annotated[
        str | None, typer.Option(help="The scheduled runs' workload, as JSON.")
    ] = None,
) -> None:
    """Check a playbook and register it by metadata.path with a new version."""
    try:
        text = file.read_text()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    loads = _json(workload, "--workload")
    if loads is not None and not isinstance(loads, dict):
        fail("--workload must be a JSON object")
    try:
        entry, new = apply_playbook(KafkaSettings(), text, cron, loads)
    except PlaybookError as exc:
        for problem in exc.problems[1:]:
            console.print(f"  {problem}", highlight=False)
        fail(
            f"{file}: {exc.problems[0]}"
            + (f" (and {len(exc.problems) - 1} more above)" if len(exc.problems) > 1 else "")
        )
    except (RuntimeError, TimeoutError) as exc:
        fail(str(exc))
    verb = "applied" if new else "unchanged:"
    console.print(f"{verb} {entry.path} version {entry.version}", highlight=False)


@workflow_app.command("run")
def run(
    path: Annotated[str, typer.Argument(help="The playbook's path (metadata.path).")],
    workload: Annotated[str | None, typer.Option(help="Workload variables, as JSON.")] = None,
    version: Annotated[int | None, typer.Option(help="A version (default: the latest).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the run until it ends.")] = False,
    timeout: Annotated[float, typer.Option(help="How long --wait waits (s).")] = 600.0,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """Start a run; prints its id (with --wait, its steps as they go, and its end)."""
    body: dict[str, Any] = {"path": path}
    loads = _json(workload, "--workload")
    if loads is not None:
        body["workload"] = loads
    if version is not None:
        body["version"] = version
    answer = _ask(gateway, key, "/v1/workflows/runs", body=body)
    eid = answer["id"]
    console.print(f"{eid} {answer['status']} {answer['path']} version {answer['version']}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    with console.status("running") as status:
        while time.monotonic() < deadline:
            try:
                now = call_gateway(_gateway(gateway), key, f"/v1/workflows/runs/{eid}")
            except ValueError:
                time.sleep(0.2)
                continue
            for name, step in now.get("steps", {}).items():
                if shown.get(name) != step["state"]:
                    shown[name] = step["state"]
                    console.print(f"  {name}: {step['state']}", highlight=False)
            status.update(
                f"{now['status']}: {sum(1 for s in shown.values() if s != 'RUNNING')}"
                f" of {len(shown)} steps done"
            )
            if now["status"] in engine.FINISHED:
                _show_end(now)
                if now["status"] != engine.COMPLETED:
                    raise typer.Exit(1)
                return
            time.sleep(0.2)
    fail(f"run {eid} did not end within {timeout:.0f} s")


def _show_end(run: dict[str, Any]) -> None:
    console.print(f"{run['id']} {run['status']} in {run.get('duration_ms')} ms", highlight=False)
    if run.get("error"):
        console.print(f"error: {run['error']}", highlight=False)
    if run.get("result") is not None:
        console.print(f"result: {orjson.dumps(run['result']).decode()}", highlight=False)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@workflow_app.command("status")
def status(
    execution_id: Annotated[str, typer.Argument(help="The run's id.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """A run's state and its steps' states, attempts, durations and results."""
    answer = _ask(gateway, key, f"/v1/workflows/runs/{urllib.parse.quote(execution_id, safe='')}")
    if json_out:
        console.print_json(orjson.dumps(answer).decode())
        return
    console.print(
        f"{answer['id']} {answer['status']} {answer['path']} version {answer['version']}",
        highlight=False,
    )
    rows = [
        [
            name,
            s["state"],
            s["attempts"],
            s.get("duration_ms"),
            f"{s.get('items_done')}/{s['items']}" if "items" in s else "",
            s.get("error") or orjson.dumps(s.get("result")).decode()[:80],
        ]
        for name, s in answer.get("steps", {}).items()
    ]
    print_rows(["step", "state", "attempts", "ms", "items", "result / error"], rows)
    _show_end(answer)


@workflow_app.command("cancel")
def cancel(
    execution_id: Annotated[str, typer.Argument(help="The run's id.")],
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """Cancel a run: its running steps are cancelled and nothing new starts."""
    answer = _ask(
        gateway,
        key,
        f"/v1/workflows/runs/{urllib.parse.quote(execution_id, safe='')}",
        method="DELETE",
    )
    console.print(f"{answer['id']} {answer['status']}", highlight=False)


@workflow_app.command("list")
def list_runs(
    run_status: Annotated[
        str | None, typer.Option("--status", help="Only runs in this state.")
    ] = None,
    path: Annotated[str | None, typer.Option(help="Only runs of this playbook.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (latest first).")] = 20,
    key: KeyOption = "",
    gateway: GatewayOption = None,
) -> None:
    """The latest runs."""
    query = urllib.parse.urlencode(
        {k: v for k, v in {"status": run_status, "path": path, "limit": limit}.items() if v}
    )
    answer = _ask(gateway, key, f"/v1/workflows/runs?{query}")
    rows = [
        [
            r["id"],
            r["path"],
            r["version"],
            r["status"],
            _when(r.get("requested_at_ms")),
            r.get("duration_ms"),
        ]
        for r in answer["runs"]
    ]
    print_rows(["id", "path", "version", "status", "requested", "ms"], rows)


@workflow_app.command("events")
def events(
    execution_id: Annotated[str, typer.Argument(help="The run's id.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON event a line.")] = False,
) -> None:
    """A run's timeline from the event log."""
    try:
        found = read_events(KafkaSettings(), execution_id)
    except (RuntimeError, TimeoutError) as exc:
        fail(str(exc))
    if not found:
        fail(f"no events of run {execution_id}")
    if json_out:
        for evt in found:
            console.print(
                orjson.dumps({k: v for k, v in evt.items() if not k.startswith("_")}).decode(),
                highlight=False,
                soft_wrap=True,
            )
        return
    start = found[0]["at_ms"]
    rows = []
    for evt in found:
        where = evt.get("step", "")
        if evt.get("iteration") is not None:
            where += f"[{evt['iteration']}]"
        detail = evt.get("error") or evt.get("status") or ""
        if evt["type"] == ev.COMMAND_ISSUED:
            detail = f"{evt.get('tool')} attempt {evt.get('attempt')}"
        elif evt["type"] == ev.STEP_EXIT and evt.get("next"):
            detail = f"{evt.get('status')} -> {', '.join(evt['next'])}"
        rows.append(
            [
                f"+{evt['at_ms'] - start}",
                evt["type"],
                where,
                evt.get("duration_ms"),
                str(detail)[:100],
            ]
        )
    print_rows(["ms", "event", "step", "took ms", "detail"], rows, title=execution_id)


@workflow_app.command("rebuild")
def rebuild() -> None:
    """Rebuild every run from the event topic alone and compare it with the table."""
    try:
        differ = compare(KafkaSettings())
    except (RuntimeError, TimeoutError) as exc:
        fail(str(exc))
    if differ:
        for eid, how in differ.items():
            console.print(f"{eid}: {how}", highlight=False)
        fail(f"{len(differ)} runs differ from their rebuild")
    console.print("every run's rebuild from the event topic equals the table")
