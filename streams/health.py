"""The worker's `/health`, `/ready` and `/metrics`, served by the process shell from a thread.

A thread of its own, not the worker's event loop (`Probes.serve_in_thread`): a loop that
is wedged (a batch that never completes) still gets a truthful answer, `/ready` 503 once
the stall watchdog says so. `/health` says the process is up, its agent alive and the
config topic followed; `/ready` also needs the agent to have moved its input on within
`SLUICE_WORKER_STALL_AFTER_S` whenever input is waiting, and the config topic read to
its end. Every answer carries `seconds_since_progress`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry

from core.follower import Followed
from core.shell import Probe, Probes, joined
from core.watchdog import StallWatchdog


def worker_probes(
    registry: CollectorRegistry,
    watchdog: StallWatchdog,
    died: Callable[[], str | None],
    config: Followed,
) -> Probes:
    """The worker's probes; `died()` is why the agent stopped, or None while it runs;
    `config` the worker's follower of the config topic."""

    def health() -> Probe:
        return joined(died(), config.failure())

    def ready() -> Probe:
        return joined(watchdog.problem(), config.problem())

    def details() -> dict[str, Any]:
        return {"seconds_since_progress": round(watchdog.seconds_stalled(), 1)}

    return Probes(registry, health=health, ready=ready, details=details)


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    watchdog: StallWatchdog,
    died: Callable[[], str | None],
    config: Followed,
) -> WSGIServer:
    """Serve the endpoints on a daemon thread; raises OSError when the port is taken."""
    return worker_probes(registry, watchdog, died, config).serve_in_thread(host, port)
