"""The workflow engine on its own: a run driven by a stand-in for the tool runner.

The runner here answers each step job at once with what `answer` says: these tests check
routing, fan-in, loops, retries and the fold (a rebuild equals the state), the parts that
need no broker. The integration tests run the same playbooks on Kafka.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from core.workflows import engine
from core.workflows import events as ev
from core.workflows.playbook import PlaybookError, check

Answer = Callable[[dict[str, Any]], tuple[str, Any]]


def book(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(text)
    check(doc)
    return doc


def drive(
    doc: dict[str, Any],
    answer: Answer,
    workload: dict[str, Any] | None = None,
    max_in_flight_seen: list[int] | None = None,
) -> tuple[engine.Run, list[dict[str, Any]]]:
    """Run `doc` to its end: every event in order, the runner answering jobs in order."""
    env = engine.Env(playbook=lambda path, version: (1, doc))
    log: list[dict[str, Any]] = [
        ev.event("run-1", ev.PLAYBOOK_REQUESTED, "run-1:requested", path="p", workload=workload)
    ]
    run = engine.apply(None, log[0])
    assert run is not None
    now = 1_000
    pending: list[engine.JobSubmit] = []
    for _ in range(100_000):
        out = engine.decide(run, now, env)
        log.extend(out.events)
        pending.extend(out.submits)
        if max_in_flight_seen is not None:
            max_in_flight_seen.append(len(run.commands))
        if run.finished:
            break
        if not pending:
            due = engine.next_due(run)
            assert due is not None, f"stuck: {engine.summary(run)}"
            now = max(now + 1, due)
            continue
        job = pending.pop()
        status, value = answer(job.payload)
        cid = job.payload["command_id"]
        now += 1
        if status == "ok":
            evt = ev.event(
                "run-1",
                ev.COMMAND_COMPLETED,
                f"{cid}:completed",
                at_ms=now,
                command_id=cid,
                result=value,
            )
        else:
            evt = ev.event(
                "run-1",
                ev.COMMAND_FAILED,
                f"{cid}:failed",
                at_ms=now,
                command_id=cid,
                error=value,
                output={"status": "error", "error": value},
            )
        engine.apply(run, evt)
        log.append(evt)
    rebuilt = engine.rebuild(log)["run-1"]
    assert engine.summary(rebuilt) == engine.summary(run)
    return run, log


def python_result(payload: dict[str, Any]) -> tuple[str, Any]:
    """The stand-in runner: a python task's `result = <literal>` or its input."""
    tool = payload["tool"]
    code = tool.get("code", "")
    if code.startswith("result = "):
        return "ok", eval(code.removeprefix("result = "), {}, dict(tool.get("input") or {}))
    return "ok", tool.get("input")


DIAMOND = """
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: diamond, path: tests/diamond}
workflow:
  - step: start
    next: {spec: {mode: inclusive}, arcs: [{step: left}, {step: right}]}
  - step: left
    tool: {kind: python, code: "result = 'L'"}
    next: {arcs: [{step: join}]}
  - step: right
    tool:
      - {name: one, kind: python, code: "result = 1"}
      - {name: two, kind: python, code: "result = one + 1", input: {one: "{{ one }}"}}
    next: {arcs: [{step: join}]}
  - step: join
    tool: {kind: python, code: "result = [l, r]", input: {l: "{{ left }}", r: "{{ right }}"}}
    next: {arcs: [{step: end}]}
  - step: end
"""


def test_diamond_join_runs_once_with_both_results() -> None:
    run, log = drive(book(DIAMOND), python_result)
    assert run.status == engine.COMPLETED
    enters = [e for e in log if e["type"] == ev.STEP_ENTER and e["step"] == "join"]
    assert len(enters) == 1
    assert run.results["join"] == ["L", 2]
    assert run.results["right"] == 2
    # An `end` without a tool closes the run: the run's result is the join's.
    assert run.result == ["L", 2]


LOOP = """
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: loop, path: tests/loop}
workload: {items: [5, 3, 9, 1]}
workflow:
  - step: start
    loop: {in: "{{ workload.items }}", iterator: n, spec: {mode: parallel, max_in_flight: 2}}
    tool: {kind: python, code: "result = n * 10", input: {n: "{{ iter.n }}"}}
    next: {arcs: [{step: end}]}
  - step: end
    tool: {kind: python, code: "result = xs", input: {xs: "{{ start }}"}}
"""


def test_loop_keeps_item_order_and_its_limit() -> None:
    seen: list[int] = []
    # The runner answers the latest job first: results must still be in item order.
    run, log = drive(book(LOOP), python_result, max_in_flight_seen=seen)
    assert run.result == [50, 30, 90, 10]
    assert max(seen) <= 2
    items = [e for e in log if e["type"] == ev.LOOP_ITEM]
    assert [e["iteration"] for e in items] == [0, 1, 2, 3]


ROUTE = """
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: route, path: tests/route}
workload: {size: 7}
workflow:
  - step: start
    tool: {kind: python, code: "result = {'big': size > 5}", input: {size: "{{ size }}"}}
    next:
      spec: {mode: exclusive}
      arcs:
        - {step: small, when: "{{ not start.big }}"}
        - {step: large, when: "{{ start.big }}", set: {ctx.label: "big-{{ size }}"}}
  - step: small
    tool: {kind: python, code: "result = 'small'"}
  - step: large
    tool: {kind: python, code: "result = label", input: {label: "{{ ctx.label }}"}}
"""


def test_when_takes_the_selected_branch_and_set_is_seen_downstream() -> None:
    run, _ = drive(book(ROUTE), python_result)
    assert "small" not in run.steps
    assert run.results["large"] == "big-7"
    assert run.result == "big-7"


RETRY = """
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: retry, path: tests/retry}
workflow:
  - step: start
    tool:
      kind: python
      code: "result = 1"
      spec:
        policy:
          rules:
            - when: "{{ output.status == 'error' }}"
              then: {do: retry, attempts: 3, backoff: exponential, delay: 0.5}
"""


def test_retry_policy_retries_until_success() -> None:
    calls: list[int] = []

    def flaky(payload: dict[str, Any]) -> tuple[str, Any]:
        calls.append(payload["attempt"])
        return ("error", "boom") if len(calls) < 3 else ("ok", "fine")

    run, log = drive(book(RETRY), flaky)
    assert run.status == engine.COMPLETED
    assert calls == [1, 2, 3]
    retries = [e for e in log if e["type"] == ev.COMMAND_RETRY]
    # Backoff 0.5 s, then 1 s.
    assert [r["due_ms"] - r["at_ms"] for r in retries] == [500, 1000]


def test_retries_spent_fail_the_run_with_the_reason() -> None:
    run, _ = drive(book(RETRY), lambda p: ("error", "still broken"))
    assert run.status == engine.FAILED
    assert run.error is not None
    assert "still broken" in run.error
    assert "3 attempts" in run.error


def test_a_failed_step_routes_to_an_arc_that_handles_it() -> None:
    doc = book("""
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: f, path: tests/f}
workflow:
  - step: start
    tool: {kind: python, code: "x"}
    next: {arcs: [{step: cleanup, when: "{{ event.name == 'step.failed' }}"}, {step: end}]}
  - step: cleanup
    tool: {kind: python, code: "result = 'cleaned'"}
  - step: end
""")
    run, _ = drive(doc, lambda p: ("error", "nope") if p["step"] == "start" else python_result(p))
    assert run.status == engine.COMPLETED
    assert run.results["cleanup"] == "cleaned"
    assert "end" not in run.steps


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("tool: {kind: shell, cmd: ls}", "tool kind 'shell' is not supported"),
        ("tool: {kind: python, code: 'result = {{ 1 + }}'}", "template"),
        ("tool: {kind: python, code: 'x', retries: 3}", "does not take retries"),
        ("next: {arcs: [{step: nowhere}]}", "no such step"),
        ("loop: {in: [1], iterator: i, spec: {mode: cursor}}", "loop"),
    ],
)
def test_unsupported_playbooks_are_refused_naming_step_and_reason(text: str, reason: str) -> None:
    doc = yaml.safe_load(
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: bad, path: t/bad}\n"
        f"workflow:\n  - step: start\n    {text}\n"
    )
    with pytest.raises(PlaybookError) as info:
        check(doc)
    assert "step 'start'" in str(info.value)
    assert reason in str(info.value)
