"""Playbooks: the subset of NoETL's `noetl.io/v2` format that Sluice runs.

A playbook is checked whole when it is applied (`check`): a field outside the subset, a
tool kind Sluice has no runner for, an arc to a step that does not exist or a template
that does not parse is refused there, naming the step and the reason, never in the middle
of a run. The subset (README, "Workflows"):

- `apiVersion: noetl.io/v2`, `kind: Playbook`, `metadata` (`name`, `path`, optional
  `description`, `version`, `labels`), `workload` (variables), `workflow` (the steps);
- a step: `step` (its name), `desc`, `input`, `tool` (one task or a list run in order),
  `loop` (`in`, `iterator`, `spec.mode` sequential | parallel, `spec.max_in_flight`),
  `next` (`spec.mode` exclusive | inclusive, `arcs` of `step`, `when`, `set`), `set`,
  `spec.timeout`;
- a task: `kind` (python, http, postgres, duckdb, playbook, job, warehouse, noop), its
  kind's fields, `name`, `timeout` (seconds), `spec.policy.rules` (NoETL's rules:
  `when` + `then: {do: retry | fail | continue | break | jump, attempts, backoff, delay,
  to}`, and an `else`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.workflows.templates import check as check_template
from core.workflows.templates import strings

NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
PATH = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$"
START = "start"
END = "end"

# The fields each tool kind takes, beside `kind`, `name`, `desc`, `timeout`, `spec`; the
# ones in the second set are required (a tuple: one of them).
TOOL_FIELDS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "python": (frozenset({"code", "input", "libs"}), ("code",)),
    "http": (
        frozenset({"method", "url", "endpoint", "headers", "params", "payload", "body", "auth"}),
        ("url", "endpoint"),
    ),
    "postgres": (frozenset({"auth", "query", "command"}), ("query", "command")),
    "duckdb": (frozenset({"query", "command"}), ("query", "command")),
    "warehouse": (frozenset({"query"}), ("query",)),
    "playbook": (frozenset({"path", "version", "input", "return_step"}), ("path",)),
    "job": (frozenset({"queue", "payload", "priority"}), ("queue",)),
    "noop": (frozenset({"input", "result"}), ()),
}
# Tool kinds that run as jobs on the workflow queue (the others the orchestrator runs).
RUNNER_KINDS = frozenset({"python", "http", "postgres", "duckdb", "warehouse"})
COMMON_TOOL_FIELDS = frozenset({"kind", "name", "desc", "timeout", "spec"})
ACTIONS = ("retry", "fail", "continue", "break", "jump")
MAX_BACKOFF_S = 3600.0


class PlaybookError(ValueError):
    """A playbook Sluice does not run: every reason, each naming where it is."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Then(_Model):
    """What a matching policy rule does."""

    do: Literal["retry", "fail", "continue", "break", "jump"]
    attempts: int | None = Field(default=None, ge=1, le=100)
    backoff: Literal["none", "fixed", "linear", "exponential"] | None = None
    delay: float | None = Field(default=None, ge=0, le=MAX_BACKOFF_S)
    max_delay: float | None = Field(default=None, ge=0, le=MAX_BACKOFF_S)
    to: str | None = None


class Else(_Model):
    then: Then


class Rule(_Model):
    """A policy rule: `when` (a condition on `output`) and `then`; or an `else`."""

    when: str | None = None
    then: Then | None = None
    else_: Else | None = Field(default=None, alias="else")

    def action(self) -> Then:
        """What this rule does when it applies."""
        if self.then is not None:
            return self.then
        assert self.else_ is not None
        return self.else_.then


class Policy(_Model):
    mode: Literal["exclusive"] = "exclusive"
    on_unmatched: Literal["continue", "fail"] = "continue"
    rules: tuple[Rule, ...]


class TaskSpec(_Model):
    policy: Policy | None = None
    timeout: float | str | None = None


class LoopSpec(_Model):
    mode: Literal["sequential", "parallel"] = "sequential"
    max_in_flight: int | str | None = None


class Loop(_Model):
    in_: str | list[Any] = Field(alias="in")
    iterator: Annotated[str, Field(pattern=NAME)]
    spec: LoopSpec = LoopSpec()


class ArcSpec(_Model):
    mode: Literal["exclusive", "inclusive"] = "exclusive"
    on_no_match: Literal["complete", "quiet"] = "complete"


class Arc(_Model):
    step: str
    when: str | bool | None = None
    set: dict[str, Any] | None = None


class Next(_Model):
    spec: ArcSpec = ArcSpec()
    arcs: tuple[Arc, ...] = ()


class StepSpec(_Model):
    timeout: float | str | None = None


class Step(_Model):
    step: Annotated[str, Field(pattern=NAME)]
    desc: str | None = None
    input: dict[str, Any] | None = None
    tool: dict[str, Any] | tuple[dict[str, Any], ...] | None = None
    loop: Loop | None = None
    next: Next | None = None
    set: dict[str, Any] | None = None
    spec: StepSpec | None = None

    @field_validator("next", mode="before")
    @classmethod
    def _arcs_only(cls, value: object) -> object:
        # `next: [arcs]` and `next: step_name` are shorthands of an exclusive router.
        if isinstance(value, str):
            return {"arcs": [{"step": value}]}
        if isinstance(value, list):
            return {"arcs": value}
        return value

    @property
    def tasks(self) -> tuple[dict[str, Any], ...]:
        """The step's tool as a list of tasks (none: a step that only routes)."""
        if self.tool is None:
            return ()
        if isinstance(self.tool, dict):
            return (self.tool,)
        return self.tool

    def task_name(self, index: int) -> str:
        """A task's label: its `name`, or the step's name for a single task."""
        name = self.tasks[index].get("name")
        if isinstance(name, str):
            return name
        return self.step if len(self.tasks) == 1 else f"task_{index}"

    def targets(self) -> list[str]:
        """The steps its arcs lead to."""
        return [arc.step for arc in self.next.arcs] if self.next else []


class Metadata(_Model):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    path: Annotated[str, Field(pattern=PATH)]
    description: str | None = None
    version: str | int | float | None = None
    labels: dict[str, str] | None = None


class Playbook(_Model):
    api_version: Literal["noetl.io/v2"] = Field(alias="apiVersion")
    kind: Literal["Playbook"]
    metadata: Metadata
    workload: dict[str, Any] = {}
    workflow: Annotated[tuple[Step, ...], Field(min_length=1)]

    def steps(self) -> dict[str, Step]:
        """The steps by name."""
        return {s.step: s for s in self.workflow}

    def reach(self) -> dict[str, frozenset[str]]:
        """For each step, every step its arcs lead to, directly or further on."""
        direct = {s.step: set(s.targets()) for s in self.workflow}
        out: dict[str, frozenset[str]] = {}
        for name, targets in direct.items():
            seen: set[str] = set()
            todo = list(targets)
            while todo:
                nxt = todo.pop()
                if nxt in seen or nxt not in direct:
                    continue
                seen.add(nxt)
                todo.extend(direct[nxt])
            out[name] = frozenset(seen)
        return out


def seconds(value: float | str | None) -> float | None:
    """A duration: seconds, or text like `30s`, `5m`, `1h`, `250ms`."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (like 30s, 5m, 1h)")
    number = float(match.group(1))
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]


def _task_problems(step: Step, index: int, task: dict[str, Any]) -> Iterator[str]:
    where = f"step {step.step!r}" + (f", tool[{index}]" if isinstance(step.tool, tuple) else "")
    kind = task.get("kind")
    if kind not in TOOL_FIELDS:
        supported = ", ".join(sorted(TOOL_FIELDS))
        yield f"{where}: tool kind {kind!r} is not supported (supported: {supported})"
        return
    allowed, required = TOOL_FIELDS[kind]
    unknown = sorted(set(task) - allowed - COMMON_TOOL_FIELDS)
    if unknown:
        yield f"{where}: {kind} tool does not take {', '.join(unknown)}"
    if required and not any(task.get(name) not in (None, "") for name in required):
        yield f"{where}: {kind} tool needs {' or '.join(required)}"
    if kind == "postgres" and not task.get("auth"):
        yield f"{where}: postgres tool needs auth (the name of a credential)"
    if kind == "python" and not isinstance(task.get("code"), str):
        yield f"{where}: python tool's code must be text"
    if kind == "python" and task.get("libs") is not None:
        libs = task["libs"]
        if not isinstance(libs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*", v)
            for k, v in libs.items()
        ):
            yield f"{where}: python tool's libs must map names to module names"
    if "name" in task and not (isinstance(task["name"], str) and re.match(NAME, task["name"])):
        yield f"{where}: tool name {task['name']!r} is not a name (letters, digits, _)"
    try:
        spec = TaskSpec.model_validate(task.get("spec") or {})
        seconds(spec.timeout)
        seconds(task.get("timeout"))
    except (ValidationError, ValueError) as exc:
        yield f"{where}: {_reason(exc)}"
        return
    names = {step.task_name(i) for i in range(len(step.tasks))}
    for rule in spec.policy.rules if spec.policy else ():
        if (rule.then is None) == (rule.else_ is None):
            yield f"{where}: a policy rule has `when` and `then`, or an `else`"
            continue
        action = rule.action()
        if action.do == "jump" and action.to not in names:
            yield f"{where}: policy jumps to {action.to!r}, not a task of this step"


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
    return str(exc)


def check(document: Any) -> Playbook:
    """The playbook in `document` (parsed YAML), or PlaybookError with every reason."""
    if not isinstance(document, dict):
        raise PlaybookError(["a playbook is a YAML mapping"])
    extra = sorted(set(document) - {"apiVersion", "kind", "metadata", "workload", "workflow"})
    if extra:
        raise PlaybookError(
            [f"playbook: {', '.join(extra)} not supported (only metadata, workload, workflow)"]
        )
    problems: list[str] = []
    steps = document.get("workflow")
    if isinstance(steps, list):
        # Name the step of a problem in one step's fields rather than an index.
        for index, raw in enumerate(steps):
            try:
                Step.model_validate(raw)
            except ValidationError as exc:
                name = raw.get("step") if isinstance(raw, dict) else None
                where = f"step {name!r}" if isinstance(name, str) else f"workflow[{index}]"
                problems.append(f"{where}: {_reason(exc)}")
    if problems:
        raise PlaybookError(problems)
    try:
        book = Playbook.model_validate(document)
    except ValidationError as exc:
        raise PlaybookError([f"playbook: {_reason(exc)}"]) from None
    names = [s.step for s in book.workflow]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"step {name!r}: defined twice")
        seen.add(name)
    if START not in seen:
        problems.append(f"workflow: no step named {START!r} (a run begins there)")
    for step in book.workflow:
        for target in step.targets():
            if target not in seen:
                problems.append(f"step {step.step!r}: an arc leads to {target!r}, no such step")
        for index, task in enumerate(step.tasks):
            problems.extend(_task_problems(step, index, task))
        try:
            seconds(step.spec.timeout if step.spec else None)
        except ValueError as exc:
            problems.append(f"step {step.step!r}: spec.timeout: {exc}")
        limit = step.loop.spec.max_in_flight if step.loop is not None else None
        if isinstance(limit, int) and limit < 1:
            problems.append(f"step {step.step!r}: loop max_in_flight must be 1 or more")
        for where, text in strings(step.model_dump(by_alias=True, exclude_none=True)):
            reason = check_template(text)
            if reason is not None:
                problems.append(f"step {step.step!r}: {where}: {reason}")
    for where, text in strings(book.workload):
        reason = check_template(text)
        if reason is not None:
            problems.append(f"workload.{where}: {reason}")
    if problems:
        raise PlaybookError(problems)
    return book
