"""Per-destination filters and user transforms, applied by the processor.

A transform is a plain function `transform(event) -> event | list[event] | None` named in
the config (`transform: {function: "package.module:function", timeout_s: 1}`). It gets the
envelope as a dict: timestamps in epoch milliseconds, `properties`, `traits`, `context`
and `integrations` as dicts. None drops the event, a list fans it out (give each copy
its own `event_id`, or the warehouse keeps one), and an exception or running past the
time limit sends the event to the destination's DLQ with the traceback in a header.
"""

from __future__ import annotations

import operator
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from core.config import EventFilter, PropertyRule, TrackingPlan
from streams.errors import TransformResultError, TransformTimeout

JSON_FIELDS = ("properties", "traits", "context", "integrations")
TransformFn = Callable[[dict[str, Any]], Any]
_MISSING = object()


def passes(rule: EventFilter, event: dict[str, Any]) -> bool:
    """Whether `event` (decoded envelope, JSON fields as text) gets past `rule`."""
    etype, name = event["type"], event["event"]
    if (rule.allow_types and etype not in rule.allow_types) or etype in rule.deny_types:
        return False
    if (rule.allow_events and name not in rule.allow_events) or name in rule.deny_events:
        return False
    if not rule.where:
        return True
    try:
        fields = orjson.loads(event["traits" if etype == "identify" else "properties"])
    except orjson.JSONDecodeError:
        return False
    return all(_holds(r, _lookup(fields, r.property)) for r in rule.where)


def _lookup(fields: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(fields, dict) or part not in fields:
            return _MISSING
        fields = fields[part]
    return fields


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "in": lambda value, allowed: value in allowed,
}


def _holds(rule: PropertyRule, value: Any) -> bool:
    if rule.op == "exists":
        return value is not _MISSING
    if value is _MISSING:
        return rule.op == "ne"
    try:
        return bool(_COMPARE[rule.op](value, rule.value))
    except TypeError:
        return False  # a string compared with a number: the rule does not hold


_KINDS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


def plan_violations(plan: TrackingPlan, event: dict[str, Any]) -> list[str]:
    """How a track event breaks its source's tracking plan; empty when it does not."""
    if event["type"] != "track":
        return []
    name = event["event"]
    planned = plan.events.get(name)
    if planned is None:
        return [] if plan.unplanned == "allow" else [f"event {name!r} is not in the tracking plan"]
    try:
        properties = orjson.loads(event["properties"])
    except orjson.JSONDecodeError:
        properties = {}
    problems = [f"property {p!r} is required" for p in planned.required if p not in properties]
    for prop, kind in (planned.optional | planned.required).items():
        if prop in properties and not _KINDS[kind](properties[prop]):
            got = type(properties[prop]).__name__
            problems.append(f"property {prop!r} must be {kind}, not {got}")
    return problems


def flag(event: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The event with its tracking-plan violations in `context.tracking_plan.violations`."""
    context = orjson.loads(event["context"])
    context["tracking_plan"] = {"violations": problems}
    return {**event, "context": orjson.dumps(context).decode()}


def for_user(event: dict[str, Any]) -> dict[str, Any]:
    """The envelope as a transform sees it: JSON fields as dicts."""
    user = event.copy()
    for name in JSON_FIELDS:
        text = user.get(name)
        if isinstance(text, str):
            user[name] = orjson.loads(text)
    return user


def from_user(result: Any) -> list[dict[str, Any]]:
    """A transform's result as envelopes to encode (JSON fields back to text)."""
    if result is None:
        return []
    items = result if isinstance(result, list) else [result]
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise TransformResultError(
                f"a transform returns an event dict, a list of them or None, not {type(item).__name__}"
            )
        envelope = item.copy()
        for name in JSON_FIELDS:
            value = envelope.get(name, _MISSING)
            if value is not _MISSING and not isinstance(value, str):
                envelope[name] = orjson.dumps(value).decode()
        out.append(envelope)
    return out


@contextmanager
def time_limits() -> Iterator[Callable[[TransformFn, dict[str, Any], float], Any]]:
    """A caller of transforms that stops each one at its time limit.

    On the main thread (where the worker's event loop runs) a SIGALRM interrupts a
    transform that runs past its limit. Arming a timer for every call would cost two
    system calls an event, so one periodic timer ticks at a quarter of the limit while
    the batch is routed, and a tick stops the call under way once it has run longer than
    its limit: a limit of 1 s stops a transform after 1 to 1.25 s. Elsewhere than on the
    main thread the limit cannot be enforced and the call simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda fn, event, _timeout: fn(event)
        return
    clock = time.monotonic
    # The call under way: when it started and its limit; the tick interval once armed.
    running: list[float] = [0.0, 0.0]
    armed = [0.0]

    def on_alarm(_signum: int, _frame: object) -> None:
        started, limit = running
        if started and clock() - started > limit:
            running[0] = 0.0
            raise TransformTimeout(f"the transform ran past its {limit:g} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)

    def call(fn: TransformFn, event: dict[str, Any], timeout: float) -> Any:
        tick = timeout / 4
        if not armed[0] or tick < armed[0]:
            armed[0] = tick
            signal.setitimer(signal.ITIMER_REAL, tick, tick)
        running[1] = timeout
        running[0] = clock()
        try:
            return fn(event)
        finally:
            running[0] = 0.0

    try:
        yield call
    finally:
        if armed[0]:
            signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
