"""The worker's `/health`, `/ready` and `/metrics`, served by the process shell from a thread.

A thread of its own, not the worker's event loop (`Probes.serve_in_thread`): a loop that
is wedged (a batch that never completes) still gets a truthful answer, `/ready` 503 once
the stall watchdog says so. `/health` says the process is up and its agent alive;
`/ready` also needs the agent to have moved its input on within
`SLUICE_WORKER_STALL_AFTER_S` whenever input is waiting. Every answer carries
`seconds_since_progress`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry

from core.shell import Probes
from core.watchdog import StallWatchdog


def worker_probes(
    registry: CollectorRegistry, watchdog: StallWatchdog, died: Callable[[], str | None]
) -> Probes:
    """The worker's probes; `died()` is why the agent stopped, or None while it runs."""

    def details() -> dict[str, Any]:
        return {"seconds_since_progress": round(watchdog.seconds_stalled(), 1)}

    return Probes(registry, health=died, ready=watchdog.problem, details=details)


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    watchdog: StallWatchdog,
    died: Callable[[], str | None],
) -> WSGIServer:
    """Serve the endpoints on a daemon thread; raises OSError when the port is taken."""
    return worker_probes(registry, watchdog, died).serve_in_thread(host, port)
