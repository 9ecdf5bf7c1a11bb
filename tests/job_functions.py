"""Job functions the tests' job workers run (SLUICE_JOBS_MODULES allows this module).

`ledger` appends what it does to the file its payload names, one JSON line per start
and per completion, so a test can tell how often and when each job ran.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson

from connectors.jobs import Fatal, JobContext


def _note(path: str, line: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, orjson.dumps(line) + b"\n")
    finally:
        os.close(fd)


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def ledger(payload: dict[str, Any], job: JobContext) -> dict[str, Any]:
    """Note the start; sleep `sleep` s; fail attempts up to `fail_attempts` (or every one
    with `fail_always`, at once with `fatal`, or while the file `fail_while` names
    exists); note the completion."""
    path = payload["ledger"]
    _note(path, {"id": job.id, "attempt": job.attempt, "at": time.time(), "what": "start"})
    await asyncio.sleep(float(payload.get("sleep", 0)))
    if payload.get("fatal"):
        raise Fatal("this job can never work")
    if payload.get("fail_always") or job.attempt <= int(payload.get("fail_attempts", 0)):
        raise RuntimeError(f"attempt {job.attempt} fails on purpose")
    if payload.get("fail_while") and _exists(payload["fail_while"]):
        raise RuntimeError(f"broken while {os.path.basename(payload['fail_while'])} exists")
    _note(path, {"id": job.id, "attempt": job.attempt, "at": time.time(), "what": "done"})
    return {"n": payload.get("n"), "attempt": job.attempt}


def read_ledger(path: str) -> list[dict[str, Any]]:
    """Every line `ledger` wrote, in order."""
    try:
        with open(path, "rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
