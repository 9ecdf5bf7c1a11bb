"""A workflow run: its state as a fold of its events, and what happens next.

`apply(run, event)` is the only thing that changes a run's state, and it reads nothing
but the event and the state: a run rebuilt from its events alone (`rebuild`) equals the
one the orchestrator keeps. `decide(run, now_ms, env)` looks at a run and answers what
happens next as new events (which it applies to the run as it makes them), jobs to
submit, jobs to cancel and events for other runs (a sub-playbook's request, a parent's
result). Every decision is recorded before it counts: a step's routing (which arcs were
taken, the `set` values), a loop's items, a retry's due time are in the events, so a
replay does not evaluate a template again.

Events are applied idempotently: an event about a command that is no longer outstanding,
a step instance that already exited or a run that already ended changes nothing, so one
decision written twice (a restarted orchestrator, a step job run again) counts once.

A step instance runs its units: one for a plain step, one per item for a loop. A unit
runs the step's tasks in order, each as a command (a job on the workflow queue, a job on
a named queue, a sub-playbook, or at once for `noop`); the task's policy rules decide on
each outcome: on to the next task, retry after a backoff, jump, break or fail.

Fan-in: a step reached by arcs waits ("inbox") until no running or waiting step can
still lead to it, then runs once, with every branch's result in its context.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from core.jobs import DERIVED_IDS
from core.workflows import events as ev
from core.workflows.playbook import (
    END,
    RUNNER_KINDS,
    START,
    Playbook,
    PlaybookError,
    Rule,
    Step,
    TaskSpec,
    check,
    seconds,
)
from core.workflows.templates import RenderError, render, truthy

# Run states.
REQUESTED: Final = "REQUESTED"
RUNNING: Final = "RUNNING"
COMPLETED: Final = "COMPLETED"
FAILED: Final = "FAILED"
CANCELLED: Final = "CANCELLED"
FINISHED: Final = frozenset({COMPLETED, FAILED, CANCELLED})
# Unit states (besides COMPLETED, FAILED, CANCELLED).
PENDING: Final = "PENDING"
ACTIVE: Final = "ACTIVE"
RETURNED: Final = "RETURNED"
WAITING: Final = "WAITING"

DEFAULT_ATTEMPTS = 3
DEFAULT_DELAY_S = 1.0
MAX_DELAY_S = 300.0


@dataclass
class Unit:
    """One item of a loop step (`iteration`), or the one run of a plain step (None)."""

    iteration: int | None
    item: Any = None
    task: int = 0
    attempt: int = 1
    command_id: str | None = None
    state: str = PENDING
    due_ms: int | None = None
    # The outcome of the current command, until its policy is applied: ("ok", result)
    # or ("error", output).
    outcome: tuple[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    started_ms: int | None = None
    ended_ms: int | None = None


@dataclass
class StepRun:
    """The latest instance of one step in a run."""

    name: str
    instance: int
    state: str
    entered_ms: int
    items: list[Any] | None = None
    max_in_flight: int = 1
    next_item: int = 0
    units: dict[int | None, Unit] = field(default_factory=dict)
    commands: int = 0
    exited_ms: int | None = None
    result: Any = None
    error: str | None = None

    def in_flight(self) -> int:
        return sum(1 for u in self.units.values() if u.state in (ACTIVE, RETURNED, WAITING))


@dataclass(frozen=True)
class Command:
    """A command that was issued and has no outcome yet."""

    step: str
    instance: int
    iteration: int | None
    task: int
    kind: str
    job_id: str | None
    queue: str | None
    child: str | None


@dataclass
class Run:
    """One execution of a playbook."""

    execution_id: str
    status: str
    requested_ms: int
    path: str
    version: int | None
    workload: dict[str, Any]
    parent_execution_id: str | None = None
    parent_command_id: str | None = None
    return_step: str | None = None
    started_ms: int | None = None
    ended_ms: int | None = None
    book: Playbook | None = None
    ctx: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, StepRun] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    inbox: dict[str, int] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    cancel_requested: bool = False
    # The step (not `end`) that completed last: its result is the run's unless `end` has one.
    last_exited: str | None = None
    result: Any = None
    error: str | None = None
    events: int = 0
    last_event_ms: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


# --- ids ---------------------------------------------------------------------------


def new_execution_id() -> str:
    """A new run's id."""
    return str(uuid.uuid4())


def derived(name: str) -> str:
    """A stable id for `name` (a command's job, a sub-playbook's run, a schedule tick)."""
    return str(uuid.uuid5(DERIVED_IDS, name))


def command_id(run: Run, step: StepRun, unit: Unit) -> str:
    it = "-" if unit.iteration is None else str(unit.iteration)
    return f"{run.execution_id}/{step.name}/{step.instance}/{it}/{unit.task}/{unit.attempt}"


def _enter_id(execution_id: str, step: str, instance: int) -> str:
    return f"{execution_id}/{step}/{instance}:enter"


# --- the fold ----------------------------------------------------------------------

_BOOKS: dict[str, Playbook] = {}


def parse_book(document: dict[str, Any]) -> Playbook:
    """A playbook from a `playbook.started` event (checked when applied; cached)."""
    key = orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode()
    book = _BOOKS.get(key)
    if book is None:
        book = check(document)
        if len(_BOOKS) > 1000:
            _BOOKS.clear()
        _BOOKS[key] = book
    return book


def apply(run: Run | None, evt: dict[str, Any]) -> Run | None:
    """The run after `evt` (None: no run yet, and `evt` does not start one)."""
    kind = evt["type"]
    at = int(evt["at_ms"])
    if run is None:
        if kind != ev.PLAYBOOK_REQUESTED:
            return None
        workload = evt.get("workload")
        run = Run(
            execution_id=evt["execution_id"],
            status=REQUESTED,
            requested_ms=at,
            path=str(evt.get("path")),
            version=evt.get("version"),
            workload=workload if isinstance(workload, dict) else {},
            parent_execution_id=evt.get("parent_execution_id"),
            parent_command_id=evt.get("parent_command_id"),
            return_step=evt.get("return_step"),
        )
        run.events, run.last_event_ms = 1, at
        return run
    if run.finished:
        return run  # nothing changes an ended run (its late events count for nothing)
    run.events += 1
    run.last_event_ms = max(run.last_event_ms, at)
    handler = _APPLY.get(kind)
    if handler is not None:
        handler(run, evt, at)
    return run


def _started(run: Run, evt: dict[str, Any], at: int) -> None:
    if run.status != REQUESTED:
        return
    run.status = RUNNING
    run.started_ms = at
    run.version = evt.get("version")
    run.workload = dict(evt.get("workload") or {})
    run.book = parse_book(evt["playbook"])
    run.inbox[START] = 1


def _ended(status: str) -> Callable[[Run, dict[str, Any], int], None]:
    def ended(run: Run, evt: dict[str, Any], at: int) -> None:
        if run.finished:
            return
        run.status = status
        run.ended_ms = at
        run.result = evt.get("result")
        run.error = evt.get("error")
        run.commands.clear()
        run.inbox.clear()
        for step in run.steps.values():
            if step.state == RUNNING:
                step.state = CANCELLED
                step.exited_ms = at

    return ended


def _cancel_requested(run: Run, evt: dict[str, Any], at: int) -> None:
    if not run.finished:
        run.cancel_requested = True


def _step(run: Run, evt: dict[str, Any]) -> StepRun | None:
    step = run.steps.get(evt.get("step", ""))
    if step is None or step.instance != evt.get("instance") or step.state != RUNNING:
        return None
    return step


def _unit(run: Run, evt: dict[str, Any]) -> tuple[StepRun, Unit] | None:
    step = _step(run, evt)
    if step is None:
        return None
    unit = step.units.get(evt.get("iteration"))
    return None if unit is None else (step, unit)


def _step_enter(run: Run, evt: dict[str, Any], at: int) -> None:
    name = evt["step"]
    instance = int(evt["instance"])
    if run.finished or run.instances.get(name, 0) >= instance:
        return
    run.inbox.pop(name, None)
    run.instances[name] = instance
    items = evt.get("items")
    step = StepRun(
        name,
        instance,
        RUNNING,
        at,
        items=list(items) if isinstance(items, list) else None,
        max_in_flight=int(evt.get("max_in_flight") or 1),
    )
    if step.items is None:
        step.units[None] = Unit(None, started_ms=at)
    run.steps[name] = step


def _loop_item(run: Run, evt: dict[str, Any], at: int) -> None:
    step = _step(run, evt)
    if step is None or step.items is None:
        return
    index = int(evt["iteration"])
    if index in step.units or index >= len(step.items):
        return
    step.units[index] = Unit(index, item=step.items[index], started_ms=at)
    step.next_item = max(step.next_item, index + 1)


def _issued(run: Run, evt: dict[str, Any], at: int) -> None:
    found = _unit(run, evt)
    cid = evt["command_id"]
    if found is None or cid in run.commands:
        return
    step, unit = found
    if unit.state not in (PENDING, WAITING):
        return
    unit.state = ACTIVE
    unit.command_id = cid
    unit.task = int(evt.get("task", 0))
    unit.attempt = int(evt.get("attempt", 1))
    unit.due_ms = None
    step.commands += 1
    run.commands[cid] = Command(
        step.name,
        step.instance,
        unit.iteration,
        unit.task,
        str(evt.get("tool")),
        evt.get("job_id"),
        evt.get("queue"),
        evt.get("child_execution_id"),
    )


def _outcome(status: str) -> Callable[[Run, dict[str, Any], int], None]:
    def outcome(run: Run, evt: dict[str, Any], at: int) -> None:
        cid = evt.get("command_id")
        command = run.commands.pop(cid, None) if isinstance(cid, str) else None
        if command is None:
            return
        step = run.steps.get(command.step)
        unit = step.units.get(command.iteration) if step else None
        if unit is None or unit.command_id != cid or unit.state != ACTIVE:
            return
        unit.state = RETURNED
        if status == "ok":
            unit.outcome = ("ok", evt.get("result"))
        else:
            output = evt.get("output")
            if not isinstance(output, dict):
                output = {"status": "error", "error": evt.get("error")}
            output.setdefault("status", "error")
            output.setdefault("error", evt.get("error"))
            unit.outcome = ("error", output)

    return outcome


def _command_cancelled(run: Run, evt: dict[str, Any], at: int) -> None:
    command = run.commands.pop(evt.get("command_id", ""), None)
    if command is None:
        return
    step = run.steps.get(command.step)
    unit = step.units.get(command.iteration) if step else None
    if unit is not None and unit.state == ACTIVE:
        unit.state = CANCELLED
        unit.ended_ms = at


def _retry(run: Run, evt: dict[str, Any], at: int) -> None:
    found = _unit(run, evt)
    if found is None:
        return
    _, unit = found
    if unit.state != RETURNED or unit.command_id != evt.get("command_id"):
        return
    unit.state = WAITING
    unit.outcome = None
    unit.attempt = int(evt["attempt"])
    unit.due_ms = int(evt["due_ms"])


def _call_done(run: Run, evt: dict[str, Any], at: int) -> None:
    found = _unit(run, evt)
    if found is None:
        return
    step, unit = found
    if unit.state not in (RETURNED, PENDING) or int(evt.get("task", -1)) != unit.task:
        return
    # The task's value: its command's result (or, for an error that goes on, its output).
    value: Any = evt.get("result") if unit.outcome is None else unit.outcome[1]
    if run.book is not None and unit.task < len(run.book.steps()[step.name].tasks):
        unit.results[run.book.steps()[step.name].task_name(unit.task)] = value
    unit.outcome = None
    action = evt.get("action")
    if action == "next":
        unit.task = int(evt["next_task"])
        unit.attempt = 1
        unit.state = PENDING
        return
    unit.ended_ms = at
    if action == "fail":
        unit.state = FAILED
        unit.error = str(evt.get("error") or "failed")
    else:
        unit.state = COMPLETED
        unit.result = value


def _step_exit(run: Run, evt: dict[str, Any], at: int) -> None:
    step = _step(run, evt)
    if step is None:
        return
    status = evt.get("status", COMPLETED)
    step.state = status
    step.exited_ms = at
    step.error = evt.get("error")
    for unit in step.units.values():
        if unit.state in (PENDING, ACTIVE, RETURNED, WAITING):
            unit.state = CANCELLED
    if status == COMPLETED:
        if step.items is not None:
            step.result = [step.units[i].result for i in range(len(step.items))]
        else:
            step.result = step.units[None].result if None in step.units else None
        run.results[step.name] = step.result
        if step.name != END:
            run.last_exited = step.name
    for key, value in (evt.get("set") or {}).items():
        run.ctx[key.removeprefix("ctx.")] = value
    for target in evt.get("next") or ():
        run.inbox[target] = run.inbox.get(target, 0) + 1


_APPLY: dict[str, Callable[[Run, dict[str, Any], int], None]] = {
    ev.PLAYBOOK_STARTED: _started,
    ev.PLAYBOOK_COMPLETED: _ended(COMPLETED),
    ev.PLAYBOOK_FAILED: _ended(FAILED),
    ev.PLAYBOOK_CANCELLED: _ended(CANCELLED),
    ev.CANCEL_REQUESTED: _cancel_requested,
    ev.STEP_ENTER: _step_enter,
    ev.LOOP_ITEM: _loop_item,
    ev.COMMAND_ISSUED: _issued,
    ev.COMMAND_COMPLETED: _outcome("ok"),
    ev.COMMAND_FAILED: _outcome("error"),
    ev.COMMAND_CANCELLED: _command_cancelled,
    ev.COMMAND_RETRY: _retry,
    ev.CALL_DONE: _call_done,
    ev.STEP_EXIT: _step_exit,
}


def rebuild(events: Iterable[dict[str, Any]]) -> dict[str, Run]:
    """Every run, from its events alone (in log order)."""
    runs: dict[str, Run] = {}
    for evt in events:
        eid = evt["execution_id"]
        run = apply(runs.get(eid), evt)
        if run is not None:
            runs[eid] = run
    return runs


# --- decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class JobSubmit:
    """A job the orchestrator submits for a command."""

    queue: str
    job_id: str
    payload: Any
    timeout_ms: int | None
    max_attempts: int | None
    priority: int = 0


@dataclass
class Decisions:
    """What `decide` made of a run."""

    events: list[dict[str, Any]] = field(default_factory=list)
    # Events for other runs (a sub-playbook's request or cancel, a parent's result).
    messages: list[dict[str, Any]] = field(default_factory=list)
    submits: list[JobSubmit] = field(default_factory=list)
    # Jobs to cancel: (queue, job id).
    cancels: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Env:
    """What decisions need besides the run."""

    # The playbook at a path (a version, or the latest): (version, document) or None.
    playbook: Callable[[str, int | None], tuple[int, dict[str, Any]] | None]
    queue: str = "workflows"
    timeout_s: float = 300.0
    max_in_flight: int = 1000


class _Decider:
    def __init__(self, run: Run, now: int, env: Env) -> None:
        self.run = run
        self.now = now
        self.env = env
        self.out = Decisions()

    def emit(self, kind: str, event_id: str, **fields: Any) -> None:
        evt = ev.event(self.run.execution_id, kind, event_id, at_ms=self.now, **fields)
        apply(self.run, evt)
        self.out.events.append(evt)

    def message(self, execution_id: str, kind: str, event_id: str, **fields: Any) -> None:
        self.out.messages.append(ev.event(execution_id, kind, event_id, at_ms=self.now, **fields))

    # -- the run as a whole

    def decide(self) -> Decisions:
        run = self.run
        if run.status == REQUESTED:
            self._start()
        if run.status != RUNNING:
            return self.out
        if run.cancel_requested:
            self._cancel_all()
            self._end(CANCELLED, error="cancelled")
            return self.out
        book = run.book
        assert book is not None
        steps = book.steps()
        for _ in range(10_000):
            progressed = False
            for name in list(run.steps):
                step = run.steps[name]
                if step.state == RUNNING:
                    progressed |= self._advance(step, steps[name])
                if run.status != RUNNING:
                    return self.out
            progressed |= self._fire(book)
            if not progressed:
                break
        if not any(s.state == RUNNING for s in run.steps.values()) and not run.inbox:
            # The run's result: the `end` step's, else (an `end` that only closes the run)
            # the result of the step that finished last before it.
            result = run.results.get(END)
            if result is None and run.last_exited is not None:
                result = run.results.get(run.last_exited)
            self._end(COMPLETED, result=result)
        return self.out

    def _start(self) -> None:
        run = self.run
        found = self.env.playbook(run.path, run.version)
        if found is None:
            wanted = run.path if run.version is None else f"{run.path} version {run.version}"
            self._end(FAILED, error=f"no playbook {wanted} in the catalog")
            return
        version, document = found
        try:
            book = parse_book(document)
        except PlaybookError as exc:
            self._end(FAILED, error=f"playbook {run.path} version {version}: {exc}")
            return
        workload = {**book.workload, **run.workload}
        self.emit(
            ev.PLAYBOOK_STARTED,
            f"{run.execution_id}:started",
            path=run.path,
            version=version,
            playbook=document,
            workload=workload,
            parent_execution_id=run.parent_execution_id,
        )

    def _end(self, status: str, result: Any = None, error: str | None = None) -> None:
        run = self.run
        kind = {
            COMPLETED: ev.PLAYBOOK_COMPLETED,
            FAILED: ev.PLAYBOOK_FAILED,
            CANCELLED: ev.PLAYBOOK_CANCELLED,
        }[status]
        if status != COMPLETED:
            self._cancel_all()
        self.emit(
            kind,
            f"{run.execution_id}:ended",
            status=status,
            result=result,
            error=error,
            duration_ms=self.now - (run.started_ms or run.requested_ms),
        )
        if run.parent_execution_id and run.parent_command_id:
            if status == COMPLETED:
                value = run.results.get(run.return_step) if run.return_step else result
                self.message(
                    run.parent_execution_id,
                    ev.COMMAND_COMPLETED,
                    f"{run.parent_command_id}:completed",
                    command_id=run.parent_command_id,
                    result=value,
                    child_execution_id=run.execution_id,
                )
            else:
                self.message(
                    run.parent_execution_id,
                    ev.COMMAND_FAILED,
                    f"{run.parent_command_id}:failed",
                    command_id=run.parent_command_id,
                    error=f"sub-playbook {run.path} {status.lower()}: {error}",
                    child_execution_id=run.execution_id,
                )

    def _cancel_all(self) -> None:
        run = self.run
        for cid, command in list(run.commands.items()):
            self.emit(
                ev.COMMAND_CANCELLED,
                f"{cid}:cancelled",
                command_id=cid,
                step=command.step,
                instance=command.instance,
                iteration=command.iteration,
                job_id=command.job_id,
            )
            if command.queue and command.job_id:
                self.out.cancels.append((command.queue, command.job_id))
            if command.child:
                self.message(command.child, ev.CANCEL_REQUESTED, f"{command.child}:cancel")

    # -- routing and fan-in

    def _fire(self, book: Playbook) -> bool:
        run = self.run
        if not run.inbox:
            return False
        reach = _reach(book)
        running = {n for n, s in run.steps.items() if s.state == RUNNING}
        waiting = set(run.inbox)
        fired = False
        for step in book.workflow:
            name = step.step
            if name not in run.inbox or name in running:
                continue
            others = (running | waiting) - {name}
            if any(name in reach[other] for other in others):
                continue
            self._enter(step)
            waiting.discard(name)
            running.add(name)
            fired = True
        if not fired and not running:
            # Steps that wait on each other (a cycle): the first of them goes.
            first = next(s for s in book.workflow if s.step in run.inbox)
            self._enter(first)
            fired = True
        return fired

    def _enter(self, step: Step) -> None:
        run = self.run
        instance = run.instances.get(step.step, 0) + 1
        enter_id = _enter_id(run.execution_id, step.step, instance)
        items: list[Any] | None = None
        limit = 1
        error: str | None = None
        if step.loop is not None:
            context = self._context(step, None)
            try:
                found = render(step.loop.in_, context)
                if isinstance(found, dict):
                    found = list(found.values())
                if not isinstance(found, list):
                    raise RenderError(f"loop.in gave {type(found).__name__}, not a list")
                items = found
                if step.loop.spec.mode == "parallel":
                    wanted = render(step.loop.spec.max_in_flight, context)
                    limit = int(wanted) if wanted not in (None, "") else self.env.max_in_flight
                    limit = max(1, min(limit, self.env.max_in_flight))
            except (RenderError, ValueError, TypeError) as exc:
                error = f"loop: {exc}"
                items = []
        self.emit(
            ev.STEP_ENTER,
            enter_id,
            step=step.step,
            instance=instance,
            items=items,
            max_in_flight=limit if items is not None else None,
            tokens=run.inbox.get(step.step, 1),
        )
        if error is not None:
            self._exit(step, run.steps[step.step], FAILED, error)

    # -- one step instance

    def _advance(self, state: StepRun, step: Step) -> bool:
        progressed = False
        units = state.units
        for unit in list(units.values()):
            if unit.state == RETURNED:
                self._settle(state, step, unit)
                progressed = True
            if (
                unit.state == WAITING and unit.due_ms is not None and unit.due_ms <= self.now
            ) or unit.state == PENDING:
                self._issue(state, step, unit)
                progressed = True
            if state.state != RUNNING:
                return True
        if state.items is not None:
            while (
                state.next_item < len(state.items)
                and state.in_flight() < state.max_in_flight
                and state.state == RUNNING
            ):
                index = state.next_item
                self.emit(
                    ev.LOOP_ITEM,
                    f"{_enter_id(self.run.execution_id, step.step, state.instance)}/{index}",
                    step=step.step,
                    instance=state.instance,
                    iteration=index,
                )
                self._issue(state, step, units[index])
                progressed = True
        if state.state != RUNNING:
            return True
        failed = [u for u in units.values() if u.state == FAILED]
        if failed:
            first = min(failed, key=lambda u: -1 if u.iteration is None else u.iteration)
            where = "" if first.iteration is None else f" (item {first.iteration})"
            self._exit(step, state, FAILED, f"{first.error}{where}")
            return True
        total = 1 if state.items is None else len(state.items)
        done = sum(1 for u in units.values() if u.state == COMPLETED)
        if done == total:
            if state.items is not None:
                self.emit(
                    ev.LOOP_DONE,
                    f"{_enter_id(self.run.execution_id, step.step, state.instance)}:loop",
                    step=step.step,
                    instance=state.instance,
                    count=total,
                )
            self._exit(step, state, COMPLETED, None)
            return True
        return progressed

    def _exit(self, step: Step, state: StepRun, status: str, error: str | None) -> None:
        run = self.run
        enter_id = _enter_id(run.execution_id, step.step, state.instance)
        # The in-flight units of a failed step are cancelled.
        for cid, command in list(run.commands.items()):
            if command.step == step.step and command.instance == state.instance:
                self.emit(
                    ev.COMMAND_CANCELLED,
                    f"{cid}:cancelled",
                    command_id=cid,
                    step=command.step,
                    instance=command.instance,
                    iteration=command.iteration,
                    job_id=command.job_id,
                )
                if command.queue and command.job_id:
                    self.out.cancels.append((command.queue, command.job_id))
        if status == COMPLETED:
            if state.items is not None:
                result: Any = [state.units[i].result for i in range(len(state.items))]
            else:
                result = state.units[None].result if None in state.units else None
        else:
            result = None
        context = self._context(step, None)
        context[step.step] = result
        context["event"] = {
            "name": "step.done" if status == COMPLETED else "step.failed",
            "error": error,
        }
        targets: list[str] = []
        sets: dict[str, Any] = {}
        try:
            if status == COMPLETED and step.set:
                sets.update(render(step.set, context))
            for arc in step.next.arcs if step.next else ():
                if arc.when is None:
                    if status != COMPLETED:
                        continue
                elif not truthy(arc.when, context):
                    continue
                targets.append(arc.step)
                if arc.set:
                    sets.update(render(arc.set, context))
                if step.next is not None and step.next.spec.mode == "exclusive":
                    break
        except RenderError as exc:
            status, error, targets, sets = FAILED, f"next: {exc}", [], {}
        self.emit(
            ev.STEP_EXIT,
            f"{enter_id}:exit",
            step=step.step,
            instance=state.instance,
            status=status,
            error=error,
            next=targets,
            set=sets or None,
            parent_event_id=enter_id,
            duration_ms=self.now - state.entered_ms,
        )
        if status == FAILED and not targets:
            self._end(FAILED, error=f"step {step.step}: {error}")

    # -- one unit's commands

    def _context(self, step: Step, unit: Unit | None) -> dict[str, Any]:
        run = self.run
        context: dict[str, Any] = {**run.workload, **run.ctx, **run.results}
        context.update(
            workload=run.workload,
            ctx=run.ctx,
            execution_id=run.execution_id,
            job={"execution_id": run.execution_id, "id": run.execution_id},
            workflow={"path": run.path, "version": run.version},
        )
        if unit is not None:
            if unit.iteration is not None and step.loop is not None:
                context["iter"] = {
                    step.loop.iterator: unit.item,
                    "index": unit.iteration,
                    "_index": unit.iteration,
                }
            context.update(unit.results)
            if step.input:
                context["input"] = render(step.input, context)
        return context

    def _issue(self, state: StepRun, step: Step, unit: Unit) -> None:
        run = self.run
        base = {"step": step.step, "instance": state.instance, "iteration": unit.iteration}
        if unit.task >= len(step.tasks):
            # A step without a tool: its result is its rendered input (or nothing).
            try:
                context = self._context(step, unit)
                value = context.get("input")
            except RenderError as exc:
                self.emit(
                    ev.CALL_DONE,
                    self._call_id(state, unit),
                    **base,
                    task=unit.task,
                    status="error",
                    action="fail",
                    error=str(exc),
                )
                return
            self.emit(
                ev.CALL_DONE,
                self._call_id(state, unit),
                **base,
                task=unit.task,
                status="ok",
                action="done",
                result=value,
            )
            return
        task = step.tasks[unit.task]
        kind = str(task["kind"])
        cid = command_id(run, state, unit)
        try:
            context = self._context(step, unit)
            rendered = {
                k: render(v, context) for k, v in task.items() if k not in ("spec", "name", "desc")
            }
            timeout = (
                seconds(rendered.get("timeout"))
                or seconds(TaskSpec.model_validate(task.get("spec") or {}).timeout)
                or seconds(step.spec.timeout if step.spec else None)
                or self.env.timeout_s
            )
        except (RenderError, ValueError) as exc:
            self.emit(
                ev.CALL_DONE,
                self._call_id(state, unit),
                **base,
                task=unit.task,
                status="error",
                action="fail",
                error=str(exc),
            )
            return
        rendered.pop("timeout", None)
        job = derived(f"workflow-command:{cid}")
        job_id: str | None = job
        queue: str | None = None
        child: str | None = None
        if kind in RUNNER_KINDS:
            queue = self.env.queue
            if kind == "python":
                rendered = _python(rendered, context.get("input"))
            if kind == "http" and "url" not in rendered and "endpoint" in rendered:
                rendered["url"] = rendered.pop("endpoint")
            self.out.submits.append(
                JobSubmit(
                    queue,
                    job,
                    {
                        "execution_id": run.execution_id,
                        **base,
                        "task": unit.task,
                        "command_id": cid,
                        "attempt": unit.attempt,
                        "timeout_s": timeout,
                        "tool": rendered,
                    },
                    # The runner ends the tool at its timeout and reports it; the job's
                    # own timeout is a backstop.
                    int((timeout + 10) * 1000),
                    1,
                )
            )
        elif kind == "job":
            queue = str(rendered.get("queue"))
            self.out.submits.append(
                JobSubmit(
                    queue,
                    job,
                    rendered.get("payload"),
                    int(timeout * 1000),
                    None,
                    int(rendered.get("priority") or 0),
                )
            )
        elif kind == "playbook":
            job_id = None
            child = derived(f"workflow-child:{cid}")
            version = rendered.get("version")
            workload = rendered.get("input")
            self.message(
                child,
                ev.PLAYBOOK_REQUESTED,
                f"{child}:requested",
                path=str(rendered.get("path")),
                version=int(version) if version not in (None, "") else None,
                workload=workload if isinstance(workload, dict) else {},
                parent_execution_id=run.execution_id,
                parent_command_id=cid,
                return_step=task.get("return_step"),
            )
        else:
            job_id = None
        self.emit(
            ev.COMMAND_ISSUED,
            f"{cid}:issued",
            **base,
            task=unit.task,
            command_id=cid,
            attempt=unit.attempt,
            tool=kind,
            job_id=job_id,
            queue=queue,
            child_execution_id=child,
            parent_event_id=_enter_id(run.execution_id, step.step, state.instance),
        )
        if kind == "noop":
            value = rendered.get("result", rendered.get("input", context.get("input")))
            self.emit(
                ev.COMMAND_COMPLETED,
                f"{cid}:completed",
                command_id=cid,
                result=value,
                **base,
                task=unit.task,
                tool=kind,
            )

    def _call_id(self, state: StepRun, unit: Unit) -> str:
        return f"{command_id(self.run, state, unit)}:done"

    def _settle(self, state: StepRun, step: Step, unit: Unit) -> None:
        """Apply the task's policy to the outcome of its command."""
        assert unit.outcome is not None
        status, value = unit.outcome
        task = step.tasks[unit.task]
        base = {
            "step": step.step,
            "instance": state.instance,
            "iteration": unit.iteration,
            "task": unit.task,
        }
        output = {"status": "ok", "data": value, **_http_part(value)} if status == "ok" else value
        context = self._context(step, unit)
        context.update(
            output=output, result=value if status == "ok" else None, attempt=unit.attempt
        )
        try:
            spec = TaskSpec.model_validate(task.get("spec") or {})
            action = _rule(spec.policy.rules if spec.policy else (), context)
        except RenderError as exc:
            self.emit(
                ev.CALL_DONE,
                self._call_id(state, unit),
                **base,
                status=status,
                action="fail",
                error=f"policy: {exc}",
            )
            return
        # No rule applies: an outcome goes on, an error fails the task.
        do = ("continue" if status == "ok" else "fail") if action is None else action.do
        if do == "retry":
            assert action is not None
            attempts = action.attempts or DEFAULT_ATTEMPTS
            if unit.attempt < attempts:
                delay = _delay(action.backoff, action.delay, action.max_delay, unit.attempt)
                self.emit(
                    ev.COMMAND_RETRY,
                    f"{unit.command_id}:retry",
                    **base,
                    command_id=unit.command_id,
                    attempt=unit.attempt + 1,
                    due_ms=self.now + int(delay * 1000),
                    error=output.get("error") if status == "error" else None,
                )
                return
            do = "fail" if status == "error" else "continue"
        error = None
        if do == "fail":
            reason = output.get("error") if isinstance(output, dict) else None
            error = str(reason or "failed by policy")
            if unit.attempt > 1:
                error += f" (after {unit.attempt} attempts)"
        next_task: int | None = None
        if do == "continue" and unit.task + 1 < len(step.tasks):
            next_task = unit.task + 1
        elif do == "jump":
            assert action is not None
            names = [step.task_name(i) for i in range(len(step.tasks))]
            next_task = names.index(str(action.to))
        self.emit(
            ev.CALL_DONE,
            self._call_id(state, unit),
            **base,
            status=status,
            action="next" if next_task is not None else ("fail" if do == "fail" else "done"),
            next_task=next_task,
            error=error,
        )


def _reach(book: Playbook) -> dict[str, frozenset[str]]:
    key = id(book)
    found = _REACH.get(key)
    if found is None or found[0] is not book:
        found = (book, book.reach())
        if len(_REACH) > 1000:
            _REACH.clear()
        _REACH[key] = found
    return found[1]


_REACH: dict[int, tuple[Playbook, dict[str, frozenset[str]]]] = {}


def _python(rendered: dict[str, Any], step_input: Any) -> dict[str, Any]:
    """A python task as the runner takes it: `libs` as imports, the step's input merged."""
    out = dict(rendered)
    libs = out.pop("libs", None) or {}
    if libs:
        imports = "".join(f"import {module} as {alias}\n" for alias, module in libs.items())
        out["code"] = imports + str(out.get("code", ""))
    merged: dict[str, Any] = {}
    if isinstance(step_input, dict):
        merged.update(step_input)
    if isinstance(out.get("input"), dict):
        merged.update(out["input"])
    out["input"] = merged
    return out


def _http_part(value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and isinstance(value.get("status"), int):
        return {"http": {"status": value["status"]}}
    return {}


def _rule(rules: Iterable[Rule], context: dict[str, Any]) -> Any:
    for rule in rules:
        if rule.else_ is not None:
            return rule.else_.then
        if rule.when is None or truthy(rule.when, context):
            return rule.action()
    return None


def _delay(backoff: str | None, delay: float | None, cap: float | None, attempt: int) -> float:
    base = DEFAULT_DELAY_S if delay is None else delay
    if backoff in ("none", "fixed"):
        value = base
    elif backoff == "linear":
        value = base * attempt
    else:
        value = base * 2 ** (attempt - 1)
    return min(value, cap if cap is not None else MAX_DELAY_S)


def decide(run: Run, now_ms: int, env: Env) -> Decisions:
    """What happens next in `run` (its new events are applied to it already)."""
    return _Decider(run, now_ms, env).decide()


def next_due(run: Run) -> int | None:
    """When `run` next needs a decision without a new event (a retry's backoff)."""
    due = [
        u.due_ms
        for s in run.steps.values()
        if s.state == RUNNING
        for u in s.units.values()
        if u.state == WAITING and u.due_ms is not None
    ]
    return min(due) if due else None


def _shown(value: Any, limit: int, ref: str) -> Any:
    """A result as a run's status shows it: itself, or a reference when it is large."""
    if value is None:
        return None
    size = len(orjson.dumps(value, default=str))
    if size <= limit:
        return value
    return {"$ref": ref, "bytes": size}


def summary(run: Run, result_limit: int = 4096) -> dict[str, Any]:
    """A run's state as `GET /v1/workflows/runs/<id>` shows it and the runs table holds it.

    Only state the events gave goes in (no clock), and nothing that depends on how events
    other writers sent at the same time interleave with the orchestrator's (how many
    events a run had when it ended, say): a summary of a rebuilt run equals the
    orchestrator's.
    """
    eid = run.execution_id
    steps: dict[str, Any] = {}
    for name, step in run.steps.items():
        units = step.units.values()
        entry: dict[str, Any] = {
            "state": step.state,
            "instance": step.instance,
            "attempts": step.commands,
            "entered_at_ms": step.entered_ms,
            "exited_at_ms": step.exited_ms,
            "duration_ms": None if step.exited_ms is None else step.exited_ms - step.entered_ms,
            "result": _shown(step.result, result_limit, f"events of {eid}, step {name}"),
            "error": step.error,
        }
        if step.items is not None:
            entry["items"] = len(step.items)
            entry["items_done"] = sum(1 for u in units if u.state == COMPLETED)
            entry["items_in_flight"] = step.in_flight()
        steps[name] = entry
    started = run.started_ms or run.requested_ms
    return {
        "id": eid,
        "path": run.path,
        "version": run.version,
        "status": run.status,
        "parent_execution_id": run.parent_execution_id,
        "requested_at_ms": run.requested_ms,
        "started_at_ms": run.started_ms,
        "ended_at_ms": run.ended_ms,
        "duration_ms": None if run.ended_ms is None else run.ended_ms - started,
        "result": _shown(run.result, result_limit, f"events of {eid}, the run's result"),
        "error": run.error,
        "cancel_requested": run.cancel_requested,
        "steps": steps,
        "waiting": sorted(run.inbox),
    }
