"""The in-process executor: a job runs as a call of a Python function in the worker.

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
from typing import Any

from core.errors import ConfigError


class Fatal(Exception):
    """Raised by a job function: this job can never succeed; no more attempts."""


@dataclass(frozen=True)
class JobContext:
    """What a job function may know of the job it runs."""

    id: str
    queue: str
    attempt: int
    max_attempts: int
    priority: int
    tags: tuple[str, ...]


class JobTimeout(Exception):
    """The attempt ran longer than the job's timeout."""


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
