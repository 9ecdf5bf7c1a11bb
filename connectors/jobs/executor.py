"""What runs a job: the executors' common parts, and the in-process one (a Python function).

The executors of a queue (`executor:` in its config) are one interface to the worker:
an awaitable call with the job's payload and its `JobContext`, whose result is the job's
result and whose exception fails the attempt. `command` (connectors/jobs/command.py) runs
a program, `http` (connectors/jobs/http_call.py) POSTs to a URL, `python` calls a function.

A queue's `executor: {type: python, function: "module:name"}` names the function. Only
modules the worker is started to allow may be named (`SLUICE_JOBS_MODULES`, prefixes
like `SLUICE_TRANSFORM_MODULES`): whoever can write the config topic must not be able to
run `os:system`. The function takes the job's payload (the JSON value submitted), or the
payload and a `JobContext` when it has two parameters; an `async def` function runs on
the worker's loop, any other in a thread. What it returns (JSON-serialisable) is the
job's result. An exception fails the attempt, which is retried with the queue's backoff
until its attempts are spent; `Fatal` (or a subclass) fails the job at once: DEAD.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from core.errors import ConfigError


class Fatal(Exception):
    """Raised by a job function: this job can never succeed; no more attempts."""


def _ignore(progress: float, message: str | None) -> None:
    """Progress reported where nobody follows it."""


@dataclass(frozen=True)
class JobContext:
    """What a job function may know of the job it runs."""

    id: str
    queue: str
    attempt: int
    max_attempts: int
    priority: int
    tags: tuple[str, ...]
    # When the attempt is ended (epoch milliseconds): its timeout from its start.
    deadline_ms: int = 0
    # Where `progress` goes: the job's status, at a bounded rate.
    report: Callable[[float, str | None], None] = _ignore

    def progress(self, fraction: float, message: str | None = None) -> None:
        """How far the job is (0 to 1), with what it does now: `GET /v1/jobs/<id>` shows it."""
        self.report(min(1.0, max(0.0, float(fraction))), None if message is None else str(message))

    def document(self, payload: Any) -> dict[str, Any]:
        """The job as a command reads it on stdin and an HTTP executor POSTs it."""
        return {
            "id": self.id,
            "queue": self.queue,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "tags": list(self.tags),
            "deadline_ms": self.deadline_ms,
            "payload": payload,
        }


class JobTimeout(Exception):
    """The attempt ran longer than the job's timeout."""


class JobCancelled(Exception):
    """The job was cancelled (`DELETE /v1/jobs/<id>`) while its attempt ran."""


class Retry(Exception):
    """The attempt failed and the job may succeed later: retried with the queue's backoff."""


class JobCall(Protocol):
    """An executor: what runs each job of a queue."""

    # Whether it takes the job's context as well as its payload.
    with_context: bool

    async def __call__(self, payload: Any, context: JobContext | None) -> Any:
        """The job's result; raises to fail the attempt (`Fatal`: the job)."""

    async def close(self) -> None:
        """Free what it holds (sessions, files) when its queue's loop stops."""


class PythonCall:
    """A job function, loaded once, called for each job."""

    def __init__(self, function: str, allows: Callable[[str], bool]) -> None:
        module_name, _, name = function.partition(":")
        if not allows(module_name):
            raise ConfigError(
                f"job function {function!r}: module {module_name!r} is not one this worker"
                " may import (SLUICE_JOBS_MODULES)"
            )
        try:
            module = importlib.import_module(module_name)
            target = getattr(module, name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"job function {function!r} cannot be loaded: {exc}") from exc
        if not callable(target):
            raise ConfigError(f"job function {function!r} is not callable")
        self.function = function
        self._target: Callable[..., Any] = target
        self._is_async = inspect.iscoroutinefunction(target)
        try:
            params = len(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            params = 1
        # Whether it takes the job's context (a second parameter) as well as its payload.
        self.with_context = params >= 2

    async def __call__(self, payload: Any, context: JobContext | None) -> Any:
        """The job's result; raises what the function raised.

        The worker ends an attempt that runs over its timeout (it cancels the task that
        awaits this, and the attempt fails with `JobTimeout`); a function run in a
        thread cannot be stopped: it runs on, its result is dropped.
        """
        if self._is_async:
            if self.with_context:
                return await self._target(payload, context)
            return await self._target(payload)
        args = (payload, context) if self.with_context else (payload,)
        return await asyncio.to_thread(self._target, *args)

    async def close(self) -> None:
        """Nothing to free."""
