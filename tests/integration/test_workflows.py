"""Workflows end to end: playbooks applied, runs started over HTTP, steps run as jobs by
the job worker, the orchestrator as a real process on the real broker."""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from core.follower import CompactedFollower
from core.jobs import StatusTable
from core.settings import KafkaSettings
from core.topics import Topics
from core.workflows import events as ev
from ops.baseline_services import BASE_DIR, postgres_server
from ops.cli_workflows import compare
from tests.configs import Configs
from tests.jobs_api import BEARER
from tests.pipeline import Pipeline, http_json
from tests.workflows_api import (
    RUN_BEARER,
    apply,
    events_of,
    kafka_of,
    playbook,
    shown,
    start_run,
    wait_run,
    workflow_pipeline,
)


def test_job_steps_and_set_values_reach_downstream(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    apply(
        pipe,
        playbook(
            "tests/route",
            [
                {
                    "step": "start",
                    "tool": {"kind": "job", "queue": "echo", "payload": {"n": "{{ n }}"}},
                    "next": {
                        "spec": {"mode": "exclusive"},
                        "arcs": [
                            {"step": "small", "when": "{{ start.n < 5 }}"},
                            {
                                "step": "large",
                                "when": "{{ start.n >= 5 }}",
                                "set": {"ctx.label": "big-{{ start.n }}"},
                            },
                        ],
                    },
                },
                {"step": "small", "tool": {"kind": "noop", "result": "small"}},
                {"step": "large", "tool": {"kind": "noop", "result": "{{ ctx.label }}"}},
            ],
            {"n": 1},
        ),
    )
    eid = start_run(pipe, "tests/route", {"n": 7})
    run = wait_run(pipe, eid)
    assert run["status"] == "COMPLETED", shown(run)
    assert run["steps"]["start"]["result"] == {"n": 7}
    assert "small" not in run["steps"]
    assert run["result"] == "big-7"
    types = [e["type"] for e in events_of(pipe, eid)]
    assert types[0] == ev.PLAYBOOK_REQUESTED
    assert types[-1] == ev.PLAYBOOK_COMPLETED


def _unit(evt: dict[str, Any]) -> tuple[str, int | None]:
    return evt.get("step", ""), evt.get("iteration")


def test_diamond_join_runs_once_with_both_results(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    slow = "import time\ntime.sleep({s})\nresult = {r!r}"
    apply(
        pipe,
        playbook(
            "tests/diamond",
            [
                {
                    "step": "start",
                    "next": {
                        "spec": {"mode": "inclusive"},
                        "arcs": [{"step": "left"}, {"step": "right"}],
                    },
                },
                {
                    "step": "left",
                    "tool": {"kind": "python", "code": slow.format(s=0.2, r="L")},
                    "next": {"arcs": [{"step": "join"}]},
                },
                {
                    # Two tasks in sequence, the second sees the first's result.
                    "step": "right",
                    "tool": [
                        {"name": "first", "kind": "python", "code": slow.format(s=1.0, r="R")},
                        {
                            "name": "second",
                            "kind": "python",
                            "input": {"first": "{{ first }}"},
                            "code": "result = first + '!'",
                        },
                    ],
                    "next": {"arcs": [{"step": "join"}]},
                },
                {
                    "step": "join",
                    "tool": {
                        "kind": "python",
                        "input": {"left": "{{ left }}", "right": "{{ right }}"},
                        "code": "def main(left, right):\n    return [left, right]",
                    },
                    "next": {"arcs": [{"step": "end"}]},
                },
                {"step": "end"},
            ],
        ),
    )
    eid = start_run(pipe, "tests/diamond")
    run = wait_run(pipe, eid)
    assert run["status"] == "COMPLETED", shown(run)
    assert run["steps"]["join"]["result"] == ["L", "R!"]
    log = events_of(pipe, eid)
    enters = [e for e in log if e["type"] == ev.STEP_ENTER and e["step"] == "join"]
    assert len(enters) == 1
    exits = {e["step"]: e["_offset"] for e in log if e["type"] == ev.STEP_EXIT}
    assert enters[0]["_offset"] > max(exits["left"], exits["right"])


def test_loop_of_100_never_runs_more_than_5_and_keeps_item_order(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    apply(
        pipe,
        playbook(
            "tests/loop",
            [
                {
                    "step": "start",
                    "loop": {
                        "in": "{{ workload.items }}",
                        "iterator": "n",
                        "spec": {"mode": "parallel", "max_in_flight": 5},
                    },
                    # Later items finish sooner: the results still come in item order.
                    "tool": {
                        "kind": "python",
                        "input": {"n": "{{ iter.n }}"},
                        "code": "import time\ntime.sleep((100 - n) / 2000)\nresult = n * n",
                    },
                }
            ],
        ),
    )
    eid = start_run(pipe, "tests/loop", {"items": list(range(100))})
    run = wait_run(pipe, eid, timeout=180)
    assert run["status"] == "COMPLETED", shown(run)
    log = events_of(pipe, eid)
    # The orchestrator's view: commands issued and not yet answered, in log order.
    running, most = 0, 0
    for evt in log:
        if evt["type"] == ev.COMMAND_ISSUED:
            running += 1
        elif evt["type"] in (ev.COMMAND_COMPLETED, ev.COMMAND_FAILED):
            running -= 1
        most = max(most, running)
    assert most == 5
    # The runner's view: claimed to completed, by time.
    spans = {}
    for evt in log:
        if evt["type"] == ev.COMMAND_CLAIMED:
            spans[evt["command_id"]] = [evt["at_ms"], None]
        elif evt["type"] == ev.COMMAND_COMPLETED:
            spans[evt["command_id"]][1] = evt["at_ms"]
    points = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    overlap = max(itertools.accumulate(d for _, d in points))
    assert overlap <= 5
    assert run["steps"]["start"]["items_done"] == 100
    loop_result = run["result"]
    if isinstance(loop_result, dict) and "$ref" in loop_result:
        done = next(e for e in log if e["type"] == ev.PLAYBOOK_COMPLETED)
        loop_result = done["result"]
    assert loop_result == [n * n for n in range(100)]


RETRY_CODE = """
import pathlib
counter = pathlib.Path(path)
seen = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(seen + 1))
if seen < 2:
    raise RuntimeError(f"attempt {seen + 1} fails on purpose")
result = {"attempts": seen + 1}
"""


def test_a_step_failing_twice_then_succeeding_under_a_retry_policy(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    policy = {
        "policy": {
            "rules": [
                {
                    "when": "{{ output.status == 'error' }}",
                    "then": {"do": "retry", "attempts": 3, "backoff": "linear", "delay": 0.2},
                }
            ]
        }
    }
    apply(
        pipe,
        playbook(
            "tests/retry",
            [
                {
                    "step": "start",
                    "tool": {
                        "kind": "python",
                        "input": {"path": "{{ counter }}"},
                        "code": RETRY_CODE,
                        "spec": policy,
                    },
                }
            ],
        ),
    )
    eid = start_run(pipe, "tests/retry", {"counter": str(tmp_path / "counter")})
    run = wait_run(pipe, eid)
    assert run["status"] == "COMPLETED", shown(run)
    assert run["result"] == {"attempts": 3}
    assert run["steps"]["start"]["attempts"] == 3
    log = events_of(pipe, eid)
    issued = [e["attempt"] for e in log if e["type"] == ev.COMMAND_ISSUED]
    assert issued == [1, 2, 3]
    failed = [e for e in log if e["type"] == ev.COMMAND_FAILED]
    assert len(failed) == 2
    assert "fails on purpose" in failed[0]["error"]
    assert len([e for e in log if e["type"] == ev.COMMAND_RETRY]) == 2


def test_orchestrator_killed_twice_mid_run_resumes_and_rebuilds_equal(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    apply(
        pipe,
        playbook(
            "tests/long",
            [
                {
                    "step": "start",
                    "loop": {
                        "in": "{{ workload.items }}",
                        "iterator": "n",
                        "spec": {"mode": "parallel", "max_in_flight": 3},
                    },
                    "tool": {
                        "kind": "python",
                        "input": {"n": "{{ iter.n }}"},
                        "code": "import time\ntime.sleep(0.15)\nresult = n + 1",
                    },
                    "next": {"arcs": [{"step": "end"}]},
                },
                {
                    "step": "end",
                    "tool": {
                        "kind": "python",
                        "input": {"xs": "{{ start }}"},
                        "code": "result = sum(xs)",
                    },
                },
            ],
        ),
    )
    items = list(range(40))
    ids = [start_run(pipe, "tests/long", {"items": items}) for _ in range(3)]
    for pause in (1.5, 2.5):
        time.sleep(pause)
        os.kill(pipe.pid("orchestrator"), signal.SIGKILL)
        while pipe.services["orchestrator"].pid() is not None:
            time.sleep(0.05)
        pipe.start("orchestrator")
    for eid in ids:
        run = wait_run(pipe, eid, timeout=180)
        assert run["status"] == "COMPLETED", (run["error"], run["steps"])
        assert run["result"] == sum(n + 1 for n in items)
        log = events_of(pipe, eid)
        # No step and no loop item completed twice, and each command once.
        exits = Counter(e["step"] for e in log if e["type"] == ev.STEP_EXIT)
        assert exits == {"start": 1, "end": 1}
        done = Counter((e["step"], e.get("iteration")) for e in log if e["type"] == ev.CALL_DONE)
        assert set(done.values()) == {1}
        assert len(done) == len(items) + 1
        completed = Counter(e["command_id"] for e in log if e["type"] == ev.COMMAND_COMPLETED)
        assert set(completed.values()) == {1}
        issued = Counter(e["command_id"] for e in log if e["type"] == ev.COMMAND_ISSUED)
        assert set(issued.values()) == {1}
    # Every run of the test rebuilt from the event topic alone equals the table.
    assert compare(kafka_of(pipe)) == {}


def _topics_holding(kafka: KafkaSettings, needle: bytes) -> list[str]:
    """Every topic of the test's prefix with a record whose key, value or headers hold
    `needle` (aborted transactions' records too)."""
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"scan-{kafka.topic_prefix}",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        names = [
            t
            for t in consumer.list_topics(timeout=10).topics
            if t.startswith(f"{kafka.topic_prefix}.")
        ]
        found: set[str] = set()
        parts = []
        for name in names:
            meta = consumer.list_topics(name, timeout=10).topics[name]
            parts += [TopicPartition(name, p, -2) for p in meta.partitions]
        consumer.assign(parts)
        left = {(tp.topic, tp.partition) for tp in parts}
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 1.0):
                if msg.error() is not None:
                    left.discard((msg.topic(), msg.partition()))
                    continue
                blob = (
                    (msg.key() or b"")
                    + (msg.value() or b"")
                    + b"".join(
                        header[1] if isinstance(header[1], bytes) else b""
                        for header in (msg.headers() or [])
                    )
                )
                if needle in blob:
                    found.add(str(msg.topic()))
        assert not left, f"partitions not read to their end: {sorted(left)[:5]}"
        assert len(names) > 5
        return sorted(found)
    finally:
        consumer.close()


def test_postgres_steps_use_a_credential_that_no_topic_ever_holds(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    # Not under tmp_path: the server runs as the package's user, which may not enter it.
    with postgres_server(root=BASE_DIR / prefix) as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE flows LOGIN PASSWORD '{password}'")
            conn.execute("GRANT CREATE ON SCHEMA public TO flows")
        dsn = f"host=127.0.0.1 port={server.port} user=flows password={password} dbname=postgres"
        pipe = workflow_pipeline(configs, broker, prefix, tmp_path, SLUICE_CREDENTIAL_PG_FLOWS=dsn)
        pipe.start("gateway", "jobs", "orchestrator")
        apply(
            pipe,
            playbook(
                "tests/postgres",
                [
                    {
                        "step": "start",
                        "tool": {
                            "kind": "postgres",
                            "auth": "{{ pg_auth }}",
                            "query": "CREATE TABLE people (id int, name text);"
                            " INSERT INTO people VALUES (1, 'ada'), (2, 'grace');"
                            " SELECT id, name FROM people ORDER BY id",
                        },
                        "next": {"arcs": [{"step": "count"}]},
                    },
                    {
                        "step": "count",
                        "tool": {
                            "kind": "postgres",
                            "auth": "{{ pg_auth }}",
                            "query": "SELECT count(*) AS n, current_user AS who FROM people",
                        },
                    },
                ],
                {"pg_auth": "pg_flows"},
            ),
        )
        run = wait_run(pipe, start_run(pipe, "tests/postgres"))
        assert run["status"] == "COMPLETED", (run["error"], run["steps"])
        rows = [c["rows"] for c in run["steps"]["start"]["result"].values() if c.get("rows")]
        assert rows == [[{"id": 1, "name": "ada"}, {"id": 2, "name": "grace"}]]
        (count,) = [c["rows"] for c in run["result"].values() if c.get("rows")]
        assert count == [{"n": 2, "who": "flows"}]
        # A failing statement: its error names the problem, not the credential.
        apply(
            pipe,
            playbook(
                "tests/postgres-bad",
                [
                    {
                        "step": "start",
                        "tool": {
                            "kind": "postgres",
                            "auth": "pg_flows",
                            "query": "SELECT * FROM no_such_table",
                        },
                    }
                ],
            ),
        )
        bad = wait_run(pipe, start_run(pipe, "tests/postgres-bad"))
        assert bad["status"] == "FAILED"
        assert "no_such_table" in bad["error"]
        pipe.stop()
    assert _topics_holding(kafka_of(pipe), password.encode()) == []


def job_state(pipe: Pipeline, job_id: str) -> str | None:
    """A job's state on the job status topic, read to its end."""
    table = StatusTable()
    CompactedFollower(
        kafka_of(pipe), Topics(pipe.prefix).jobs_status, table.apply, name="test-statuses"
    ).read_to_end()
    found = table.get(job_id)
    return None if found is None else found.state


def test_cancel_ends_the_running_step_and_starts_nothing_new(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    apply(
        pipe,
        playbook(
            "tests/cancel",
            [
                {
                    "step": "start",
                    "tool": {"kind": "python", "code": "import time\ntime.sleep(60)"},
                    "next": {"arcs": [{"step": "after"}]},
                },
                {"step": "after", "tool": {"kind": "python", "code": "result = 1"}},
            ],
        ),
    )
    eid = start_run(pipe, "tests/cancel")
    deadline = time.monotonic() + 60
    while not any(e["type"] == ev.COMMAND_CLAIMED for e in events_of(pipe, eid)):
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.2)
    asked = time.monotonic()
    req = urllib.request.Request(
        f"{pipe.gateway_url}/v1/workflows/runs/{eid}", headers=RUN_BEARER, method="DELETE"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 202)
    run = wait_run(pipe, eid, timeout=30)
    assert run["status"] == "CANCELLED"
    log = events_of(pipe, eid)
    (cancelled,) = [e for e in log if e["type"] == ev.COMMAND_CANCELLED]
    # The step's job (on the runner's queue, which no key may read over HTTP) by its status.
    while (state := job_state(pipe, cancelled["job_id"])) != "CANCELLED":
        assert time.monotonic() - asked < 5, state
        time.sleep(0.1)
    assert not any(e.get("step") == "after" for e in log)
    time.sleep(1)
    assert not any(e.get("step") == "after" for e in events_of(pipe, eid))


def test_a_sub_playbook_returns_its_step_result_to_the_parent(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway", "jobs", "orchestrator")
    apply(
        pipe,
        playbook(
            "tests/child",
            [
                {
                    "step": "start",
                    "tool": {"kind": "python", "input": {"x": "{{ x }}"}, "code": "result = x * 2"},
                    "next": {"arcs": [{"step": "end"}]},
                },
                {"step": "end", "tool": {"kind": "noop", "result": "child done"}},
            ],
            {"x": 0},
        ),
    )
    apply(
        pipe,
        playbook(
            "tests/parent",
            [
                {
                    "step": "start",
                    "tool": {
                        "kind": "playbook",
                        "path": "tests/child",
                        "input": {"x": "{{ x }}"},
                        "return_step": "start",
                    },
                    "next": {"arcs": [{"step": "end"}]},
                },
                {"step": "end", "tool": {"kind": "noop", "result": "{{ start + 1 }}"}},
            ],
            {"x": 1},
        ),
    )
    run = wait_run(pipe, start_run(pipe, "tests/parent", {"x": 21}))
    assert run["status"] == "COMPLETED", shown(run)
    assert run["steps"]["start"]["result"] == 42
    assert run["result"] == 43


def test_the_runs_api_refuses_what_it_cannot_take(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path)
    pipe.start("gateway")
    apply(pipe, playbook("tests/ok", [{"step": "start"}]))
    url = f"{pipe.gateway_url}/v1/workflows/runs"

    def status(body: Any, headers: dict[str, str]) -> int:
        try:
            http_json(url, body, headers=headers)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 202

    assert status({"path": "tests/ok"}, {}) == 401
    assert status({"path": "tests/ok"}, {"Authorization": "Bearer test-key"}) == 401
    assert status({"path": "tests/ok"}, BEARER) == 401  # a submit key is not a run key
    assert status({"path": "tests/none"}, RUN_BEARER) == 404
    assert status({"path": "tests/ok", "version": 9}, RUN_BEARER) == 404
    assert status({"path": "tests/ok", "workload": []}, RUN_BEARER) == 400
    assert status({"path": "tests/ok", "extra": 1}, RUN_BEARER) == 400
    assert status({"path": "tests/ok", "workload": {"x": "y" * 300_000}}, RUN_BEARER) == 413
    assert status({"path": "tests/ok"}, RUN_BEARER) == 202
    # The step runner's queue runs code: no key submits to it, only the orchestrator.
    step = {"queue": "workflows", "payload": {"tool": {"kind": "python", "code": "1"}}}
    jobs = f"{pipe.gateway_url}/v1/jobs"
    for headers in (BEARER, RUN_BEARER):
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_json(jobs, step, headers=headers)
        refused.value.close()
        assert refused.value.code in (401, 403)


def test_the_example_playbook_of_the_demo_runs_as_shipped(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    root = Path(__file__).parents[2]
    primes = configs.queue(
        "primes",
        priorities=1,
        partitions=2,
        executor={"type": "command", "argv": [str(root / "build" / "jobs" / "sieve")]},
    )
    pipe = workflow_pipeline(configs, broker, prefix, tmp_path, queues=[primes])
    pipe.env["SLUICE_JOBS_COMMANDS"] = str(root / "build" / "jobs")
    pipe.start("gateway", "jobs", "orchestrator")
    apply(pipe, (root / "examples" / "workflows" / "primes-report.yaml").read_text())
    run = wait_run(pipe, start_run(pipe, "examples/primes-report"))
    assert run["status"] == "COMPLETED", shown(run)
    limits = [100_000, 1_000_000, 5_000_000]
    assert run["steps"]["count_primes"]["items_done"] == 3
    assert run["result"] == {
        "primes_up_to": {"100000": 9592, "1000000": 78498, "5000000": 348513},
        "sum_below_largest": sum(range(max(limits))),
    }
