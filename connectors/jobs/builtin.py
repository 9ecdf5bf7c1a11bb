"""Job functions that come with Sluice: for the demo, the benchmark and trying a queue out."""

from __future__ import annotations

import asyncio
from typing import Any

from connectors.jobs.executor import JobContext


async def noop(payload: Any) -> None:
    """Does nothing: the benchmark's job."""


async def echo(payload: Any) -> Any:
    """The payload is the result."""
    return payload


async def sleep(payload: Any) -> dict[str, float]:
    """Sleeps `payload["seconds"]` (default 0.1), then answers how long it slept."""
    seconds = float(payload.get("seconds", 0.1)) if isinstance(payload, dict) else 0.1
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


async def flaky(payload: Any, job: JobContext) -> Any:
    """Like `echo`, but the first `payload["fail_attempts"]` attempts fail (for trying retries)."""
    fail = int(payload.get("fail_attempts", 0)) if isinstance(payload, dict) else 0
    if job.attempt <= fail:
        raise RuntimeError(f"attempt {job.attempt} of this job fails on purpose")
    return payload
