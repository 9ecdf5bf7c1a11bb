"""The workflow event log and the contract of the jobs that run steps.

Every event is one JSON record on `sluice.workflows.events`, keyed by its execution id, so
one run's events are in order on one partition. Fields every event has:

- `event_id`: unique; derived from what the event is about (the command, the step
  instance), so that the same decision written twice is recognisably one;
- `execution_id`, `type` (below), `at_ms` (epoch milliseconds);

and, where they apply: `parent_execution_id` (a sub-playbook's parent), `parent_event_id`
(the event this one follows from), `step`, `instance` (the how-many-th time the step ran in
the run, from 1), `iteration` (a loop item's index), `task` (the index in the step's tool
list), `command_id`, `attempt`, `job_id`, `tool` (kind), `status`, `result`, `error`,
`duration_ms`.

Who writes what:

- the gateway and the CLI: `playbook.requested`, `execution.cancel_requested`;
- the tool runner (the job function of the workflow queue): `command.claimed`, then
  `command.completed` or `command.failed` (with `output`, what retry policies see);
- the orchestrator: everything else, in Kafka transactions.
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson

# Written by the gateway or the CLI.
PLAYBOOK_REQUESTED: Final = "playbook.requested"
CANCEL_REQUESTED: Final = "execution.cancel_requested"
# Written by the orchestrator.
PLAYBOOK_STARTED: Final = "playbook.started"
PLAYBOOK_COMPLETED: Final = "playbook.completed"
PLAYBOOK_FAILED: Final = "playbook.failed"
PLAYBOOK_CANCELLED: Final = "playbook.cancelled"
STEP_ENTER: Final = "step.enter"
STEP_EXIT: Final = "step.exit"
LOOP_ITEM: Final = "loop.item"
LOOP_DONE: Final = "loop.done"
CALL_DONE: Final = "call.done"
COMMAND_ISSUED: Final = "command.issued"
COMMAND_RETRY: Final = "command.retry_scheduled"
COMMAND_CANCELLED: Final = "command.cancelled"
# Written by the tool runner (and by the orchestrator for a job that ended without one).
COMMAND_CLAIMED: Final = "command.claimed"
COMMAND_COMPLETED: Final = "command.completed"
COMMAND_FAILED: Final = "command.failed"

TYPES: Final = frozenset(
    {
        PLAYBOOK_REQUESTED,
        CANCEL_REQUESTED,
        PLAYBOOK_STARTED,
        PLAYBOOK_COMPLETED,
        PLAYBOOK_FAILED,
        PLAYBOOK_CANCELLED,
        STEP_ENTER,
        STEP_EXIT,
        LOOP_ITEM,
        LOOP_DONE,
        CALL_DONE,
        COMMAND_ISSUED,
        COMMAND_RETRY,
        COMMAND_CANCELLED,
        COMMAND_CLAIMED,
        COMMAND_COMPLETED,
        COMMAND_FAILED,
    }
)

# The step job's payload (on the workflow queue) names the command it runs:
#   {"execution_id", "step", "command_id", "attempt", "tool": {"kind": ..., rendered fields}}
# A credential is there by name only (`tool.auth`); the tool runner resolves it.
STEP_JOB_FIELDS: Final = ("execution_id", "step", "command_id", "attempt", "tool")


def now_ms() -> int:
    """Epoch milliseconds."""
    return int(time.time() * 1000)


def event(execution_id: str, kind: str, event_id: str, **fields: Any) -> dict[str, Any]:
    """One event, its `at_ms` now unless given; None fields are left out."""
    out: dict[str, Any] = {
        "event_id": event_id,
        "execution_id": execution_id,
        "type": kind,
        "at_ms": fields.pop("at_ms", None) or now_ms(),
    }
    out.update((k, v) for k, v in fields.items() if v is not None)
    return out


def encode(evt: dict[str, Any]) -> bytes:
    """The record value of an event."""
    return orjson.dumps(evt, default=str)


def decode(value: bytes) -> dict[str, Any]:
    """An event from its record value; ValueError when it is not one."""
    evt = orjson.loads(value)
    if not isinstance(evt, dict) or not isinstance(evt.get("type"), str):
        raise ValueError("not a workflow event (a JSON object with a type)")
    if not isinstance(evt.get("execution_id"), str) or not isinstance(evt.get("event_id"), str):
        raise ValueError("a workflow event needs an execution_id and an event_id")
    if not isinstance(evt.get("at_ms"), int):
        raise ValueError("a workflow event needs at_ms (epoch milliseconds)")
    return evt
