"""Workflows end to end: playbooks applied, runs started over HTTP, steps run as jobs by
the job worker, the orchestrator as a real process on the real broker."""

from __future__ import annotations

from pathlib import Path

from core.workflows import events as ev
from tests.configs import Configs
from tests.workflows_api import apply, events_of, playbook, start_run, wait_run, workflow_pipeline


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
    assert run["status"] == "COMPLETED", run
    assert run["steps"]["start"]["result"] == {"n": 7}
    assert "small" not in run["steps"]
    assert run["result"] == "big-7"
    types = [e["type"] for e in events_of(pipe, eid)]
    assert types[0] == ev.PLAYBOOK_REQUESTED
    assert types[-1] == ev.PLAYBOOK_COMPLETED
